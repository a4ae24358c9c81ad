"""Which proxy a URL goes through, from ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY``: the
choice botocore makes for its own requests (credentials, STS), so that SQS, the sink and the AWS
credential chain all take the same way out.

- The variables are read as ``urllib.request.getproxies_environment`` reads them, which botocore
  (``botocore.utils.get_environ_proxies``) and requests (``requests.utils.get_environ_proxies``)
  both call: either case, the lowercase one wins when both are set (curl's rule too), an empty
  lowercase one switches the uppercase one off, and an uppercase ``HTTP_PROXY`` is ignored when
  ``REQUEST_METHOD`` is set (a CGI process: httpoxy, CVE-2016-1000110). An ``https://`` target
  takes ``https_proxy``, an ``http://`` one ``http_proxy``; ``ALL_PROXY`` is not read (botocore's
  ``ProxyConfiguration.proxy_url_for`` does not either).
- A proxy URL without a scheme is ``http://`` (botocore's ``_fix_proxy_url``, curl);
  ``user:password@`` in it becomes ``Proxy-Authorization: Basic`` (botocore's
  ``proxy_headers_for``). Only ``http://`` proxies: TLS to the proxy itself and SOCKS are refused
  in one line rather than bypassed.
- ``NO_PROXY`` is ``urllib.request.proxy_bypass_environment``, as botocore's
  ``should_bypass_proxies`` calls it: ``*``; a host; a domain and its subdomains, with or without
  a leading dot (``example.com`` and ``.example.com`` both match ``example.com`` and
  ``sqs.example.com``, never ``notexample.com``); ``host:port``, for the URL's port (the scheme's
  default if it names none). Added, as requests and curl (7.86+) do: an IP address or a CIDR
  range (``10.0.0.0/8``) matches the IP address a URL names.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies_environment

__all__ = ["Proxy", "Route", "bypasses", "http_client_connection", "route_for"]


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy: CONNECT tunnels for https:// targets, absolute-form requests for
    http:// ones. ``str()`` is its URL without credentials (for logs and ``poller check``)."""

    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @classmethod
    def from_url(cls, text: str, what: str = "proxy") -> Proxy:
        """ValueError in one line (which never shows the credentials) unless it is an http:// proxy."""
        url = text.strip()
        if "://" not in url:
            url = "http://" + url.removeprefix("//")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{what} URL {_hide_credentials(url)!r} is malformed: {exc}") from None
        if parts.scheme.lower() != "http":
            raise ValueError(f"{what} URL {_hide_credentials(url)!r}: only http:// proxies are supported "
                             f"(not {parts.scheme}://)")
        if not parts.hostname:
            raise ValueError(f"{what} URL {_hide_credentials(url)!r} has no host")
        # 80 as urllib3 and curl default an http:// proxy's port (botocore passes it to urllib3).
        return cls(parts.hostname, port or 80, unquote(parts.username or ""), unquote(parts.password or ""))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url

    def headers(self) -> list[tuple[str, str]]:
        """``Proxy-Authorization`` when the URL had credentials, as botocore builds it."""
        if not self.username and not self.password:
            return []
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return [("Proxy-Authorization", f"Basic {token}")]


@dataclass(frozen=True, slots=True)
class Route:
    """How a URL is reached: through ``proxy``, or direct (``bypassed``: ``NO_PROXY`` said so)."""

    proxy: Proxy | None
    bypassed: bool = False

    def __str__(self) -> str:
        if self.proxy is not None:
            return f"via proxy {self.proxy}"
        return "direct (NO_PROXY)" if self.bypassed else "direct"


def route_for(url: str, proxies: Mapping[str, str] | None = None) -> Route:
    """The route to ``url`` (an http:// or https:// URL). ``proxies``: scheme -> proxy URL plus
    ``no`` -> NO_PROXY, as ``getproxies_environment`` returns them (read now when not given).
    ValueError in one line for a proxy URL this client cannot use."""
    if proxies is None:
        proxies = getproxies_environment()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    configured = proxies.get(scheme)
    if not configured:
        return Route(None)
    port = parts.port or (443 if scheme == "https" else 80)
    if bypasses(parts.hostname or "", port, proxies.get("no", "")):
        return Route(None, bypassed=True)
    return Route(Proxy.from_url(configured, f"{scheme}_proxy"))


def bypasses(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (``no_proxy``) sends ``host:port`` direct (see the module's docstring)."""
    if not no_proxy.strip():
        return False
    host = host.strip("[]").lower()
    named = f"[{host}]" if ":" in host else host
    # Not in typeshed's stub, but in urllib.request since Python 2: botocore and requests call it.
    urllib_bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if urllib_bypass(f"{named}:{port}", {"no": no_proxy.strip()}):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        try:
            if address in ipaddress.ip_network(entry.strip().strip("[]"), strict=False):
                return True
        except ValueError:  # a name, or host:port: urllib's part
            continue
    return False


def http_client_connection(url: str, route: Route, *, timeout: float,
                           context: ssl.SSLContext | None = None) -> tuple[http.client.HTTPConnection, str]:
    """An ``http.client`` connection to ``url``'s origin along ``route``, and the request target
    to use on it: a CONNECT tunnel for https://, the absolute URL for http:// through a proxy
    (for one-off requests such as ``poller check``'s; the channel's own go through the pool)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host, port = parts.hostname or "", parts.port
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = route.proxy
    conn: http.client.HTTPConnection
    if proxy is None:
        conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=context) if https
                else http.client.HTTPConnection(host, port, timeout=timeout))
        return conn, target
    if https:
        conn = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=timeout, context=context)
        conn.set_tunnel(host, port, headers=dict(proxy.headers()))
        return conn, target
    conn = _ProxiedConnection(proxy, timeout=timeout)
    authority = f"[{host}]" if ":" in host else host
    return conn, f"http://{authority}{f':{port}' if port else ''}{target}"


class _ProxiedConnection(http.client.HTTPConnection):
    """Absolute-form requests to an http:// proxy, with its credentials on every request."""

    def __init__(self, proxy: Proxy, *, timeout: float) -> None:
        super().__init__(proxy.host, proxy.port, timeout=timeout)
        self._proxy_headers = proxy.headers()

    def putrequest(self, method: str, url: str, skip_host: bool = False,
                   skip_accept_encoding: bool = False) -> None:
        super().putrequest(method, url, skip_host=skip_host, skip_accept_encoding=skip_accept_encoding)
        for name, value in self._proxy_headers:
            self.putheader(name, value)


def _hide_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}***@{authority.rpartition('@')[2]}{slash}{path}" if "@" in authority else url
