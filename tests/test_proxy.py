"""HTTP_PROXY / HTTPS_PROXY / NO_PROXY and the SQS CA bundle, against a real forward proxy the
test runs (tests/forwardproxy.py: CONNECT tunnels, absolute-form requests, Basic credentials),
LocalStack (plain HTTP, or behind a TLS front with a private CA) and a real sink."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from forwardproxy import ForwardProxy, PrivateCa, TlsFront

from channels.http import CHANNEL as HTTP_CHANNEL
from channels.http import HttpConfig
from channels.transport.http import HttpPool
from channels.transport.proxy import Proxy, Route, bypasses, route_for
from poller.sqs import BlockingSqsClient, SqsError, SqsTarget

from support import PollerProcess, dumper_sink, free_port, send_messages, wait_empty, wait_until

REGION = "us-east-1"
_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
               "all_proxy", "ALL_PROXY", "REQUEST_METHOD")
_SCRUBBED_PREFIXES = ("POLLER_", "K_SINK", "K_CE_OVERRIDES", "AWS_")


# -- which route: NO_PROXY and the variables -----------------------------------------------------

@pytest.mark.parametrize(("host", "port", "no_proxy", "bypassed"), [
    ("sqs.us-east-1.amazonaws.com", 443, "*", True),
    ("sqs.us-east-1.amazonaws.com", 443, "", False),
    ("sqs.us-east-1.amazonaws.com", 443, "sqs.us-east-1.amazonaws.com", True),   # the host
    ("SQS.us-east-1.amazonaws.com", 443, "sqs.US-east-1.amazonaws.com", True),   # names ignore case
    ("sqs.us-east-1.amazonaws.com", 443, "amazonaws.com", True),                 # a domain suffix
    ("sqs.us-east-1.amazonaws.com", 443, ".amazonaws.com", True),                # with a leading dot
    ("amazonaws.com", 443, ".amazonaws.com", True),                              # the domain itself
    ("notamazonaws.com", 443, "amazonaws.com", False),                           # not a label boundary
    ("sink.internal", 80, "localhost, .cluster.local ,internal", True),          # a list, spaces
    ("sink.default.svc.cluster.local", 80, "localhost,.cluster.local", True),
    ("sink.example.com", 80, "localhost,.cluster.local", False),
    ("127.0.0.1", 4566, "127.0.0.1", True),                                      # an IP address
    ("127.0.0.2", 4566, "127.0.0.1", False),
    ("10.1.2.3", 80, "10.0.0.0/8", True),                                        # a CIDR range
    ("11.1.2.3", 80, "10.0.0.0/8", False),
    ("::1", 8080, "::1", True),                                                  # IPv6
    ("::1", 8080, "[::1]", True),
    ("fd00::5", 80, "fd00::/8", True),
    ("sink.internal", 8080, "sink.internal:8080", True),                         # host:port
    ("sink.internal", 8081, "sink.internal:8080", False),
    ("sqs.us-east-1.amazonaws.com", 443, "sqs.us-east-1.amazonaws.com:443", True),  # the scheme's port
    ("127.0.0.1", 4566, "127.0.0.1:4566", True),
    ("127.0.0.1", 4567, "127.0.0.1:4566", False),
])
def test_no_proxy_matching(host: str, port: int, no_proxy: str, bypassed: bool) -> None:
    assert bypasses(host, port, no_proxy) is bypassed


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


def test_each_scheme_takes_its_own_variable_and_lowercase_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxy_env(monkeypatch)
    assert str(route_for("https://sqs.us-east-1.amazonaws.com/")) == "direct"
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:3128")
    monkeypatch.setenv("HTTP_PROXY", "plain:8080")  # no scheme: http://
    assert str(route_for("https://sqs.us-east-1.amazonaws.com/")) == "via proxy http://upper:3128"
    assert str(route_for("http://sink.example/")) == "via proxy http://plain:8080"
    monkeypatch.setenv("https_proxy", "http://lower:3128")  # both set: lowercase wins (curl, urllib)
    assert str(route_for("https://sqs.us-east-1.amazonaws.com/")) == "via proxy http://lower:3128"
    monkeypatch.setenv("NO_PROXY", "amazonaws.com")
    assert str(route_for("https://sqs.us-east-1.amazonaws.com/")) == "direct (NO_PROXY)"
    monkeypatch.setenv("no_proxy", "example.org")  # lowercase wins here too
    assert str(route_for("https://sqs.us-east-1.amazonaws.com/")) == "via proxy http://lower:3128"
    monkeypatch.setenv("https_proxy", "")  # an empty lowercase one switches the uppercase off
    assert str(route_for("https://sqs.us-east-1.amazonaws.com/")) == "direct"
    monkeypatch.setenv("REQUEST_METHOD", "GET")  # a CGI process: HTTP_PROXY may be a client's header
    assert str(route_for("http://sink.example/")) == "direct"
    monkeypatch.setenv("http_proxy", "http://lower:8080")
    assert str(route_for("http://sink.example/")) == "via proxy http://lower:8080"


def test_runs_start_line_names_the_sinks_route_when_a_proxy_or_no_proxy_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As SQS's: the start line says "via proxy ..." or "direct (NO_PROXY)", and nothing when
    no proxy is set."""
    _clear_proxy_env(monkeypatch)
    config = HttpConfig(sink="http://127.0.0.1:8080/")
    assert "proxy" not in HTTP_CHANNEL.describe(config).lower()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert "via proxy http://127.0.0.1:9" in HTTP_CHANNEL.describe(config)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert "direct (NO_PROXY)" in HTTP_CHANNEL.describe(config)


def test_proxy_urls_credentials_and_refusals() -> None:
    proxy = Proxy.from_url("http://us%40er:p%3Ass@proxy.corp:3128/")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == ("proxy.corp", 3128, "us@er", "p:ss")
    assert str(proxy) == "http://proxy.corp:3128" and "p:ss" not in repr(proxy)
    assert proxy.headers() == [("Proxy-Authorization", "Basic dXNAZXI6cDpzcw==")]
    assert Proxy.from_url("proxy.corp").port == 80 and Proxy.from_url("//proxy.corp:1").port == 1
    for url, why in [("socks5://user:secret@proxy:1080", "only http://"), ("https://proxy:443", "only http://"),
                     ("http://user:secret@proxy:99999", "malformed")]:
        with pytest.raises(ValueError, match=why) as info:
            Proxy.from_url(url)
        assert "secret" not in str(info.value)
    assert route_for("http://x/", {"http": "http://p:1", "no": "x"}) == Route(None, bypassed=True)


# -- the pool through the proxy ------------------------------------------------------------------

@contextmanager
def origin() -> Iterator[str]:
    """A plain HTTP server that answers every POST 200 with the request target it saw."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = f"{self.path} {self.headers['Host']}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, proxy: Proxy | None, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    https = parts.scheme == "https"

    async def go() -> tuple[int, bytes]:
        pool = HttpPool(parts.hostname or "", parts.port or (443 if https else 80), tls=https,
                        ssl_context=context, proxy=proxy, connect_timeout=5)
        try:
            return await pool.request(pool.template("/path?q=1").build(b"{}"), timeout=5)
        finally:
            pool.close()

    return asyncio.run(go())


def test_pool_sends_absolute_form_to_the_proxy_for_an_http_origin() -> None:
    with origin() as url, ForwardProxy(credentials=("user", "s3cret")) as proxy:
        authority = urlsplit(url).netloc
        status, body = _post(url, Proxy.from_url(proxy.url_with("user", "s3cret")))
        assert (status, body) == (200, f"/path?q=1 {authority}".encode())
        assert proxy.forwarded == [f"POST http://{authority}/path?q=1"]
        status, _ = _post(url, Proxy.from_url(proxy.url))  # no credentials: the proxy's 407 is the answer
        assert status == 407 and proxy.refused == [f"POST http://{authority}/path?q=1"]


def test_pool_tunnels_through_connect_for_an_https_origin(tmp_path: Path) -> None:
    ca = PrivateCa(tmp_path / "ca")
    cert, key = ca.issue()
    trust = ssl.create_default_context(cafile=ca.pem)
    with origin() as url, TlsFront(url, cert, key) as front, ForwardProxy(credentials=("user", "pw")) as proxy:
        status, body = _post(front.url, Proxy.from_url(proxy.url_with("user", "pw")), trust)
        assert (status, body) == (200, f"/path?q=1 127.0.0.1:{front.port}".encode())  # origin-form in the tunnel
        assert proxy.tunnels == [f"127.0.0.1:{front.port}"] and proxy.forwarded == []
        with pytest.raises(OSError, match=rf"proxy {proxy.url} refused the tunnel to 127.0.0.1:{front.port}: "
                                          "HTTP 407 Proxy Authentication Required"):
            _post(front.url, Proxy.from_url(proxy.url), trust)
        other = ssl.create_default_context(cafile=PrivateCa(tmp_path / "other", "other CA").pem)
        with pytest.raises(ssl.SSLCertVerificationError):  # the tunnel carries TLS end to end
            _post(front.url, Proxy.from_url(proxy.url_with("user", "pw")), other)
    with (ForwardProxy(refuse_connect=403) as refusing,
          pytest.raises(OSError, match=r"refused the tunnel to 127\.0\.0\.1:443: HTTP 403 Refused$")):
        _post("https://127.0.0.1/", Proxy.from_url(refusing.url), trust)
    dead = free_port()
    with pytest.raises(OSError, match=rf"^cannot connect to proxy http://127\.0\.0\.1:{dead}: "):
        _post("https://127.0.0.1/", Proxy.from_url(f"http://127.0.0.1:{dead}"), trust)


# -- the poller through the proxy ------------------------------------------------------------------

def _env(aws_env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without proxy, AWS or poller settings, then ``aws_env`` and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _PROXY_VARS and not k.startswith(_SCRUBBED_PREFIXES)}
    return {**env, **aws_env, **extra}


def _check(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poller", "check", *args], env=dict(env), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _run(args: Sequence[str], env: Mapping[str, str], log: Path) -> PollerProcess:
    return PollerProcess(["--processes", "1", "--wait-time", "1", "--stats-interval", "2", *args], env, log,
                         unset=_PROXY_VARS)


def test_run_sends_sqs_and_sink_requests_through_http_proxy(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue()
    with dumper_sink() as sink, ForwardProxy(credentials=("user", "s3cret")) as proxy:
        env = _env(aws_env, {"http_proxy": proxy.url_with("user", "s3cret")})
        result = _check(["--queue-url", queue.url, "--sink", sink.url], env)
        assert result.returncode == 0, result.stderr
        assert f"SQS via proxy {proxy.url}" in result.stdout
        assert re.search(rf"answered OPTIONS with HTTP \d+, via proxy {proxy.url}\n", result.stdout)
        ids = send_messages(sqs, queue.url, [{"MessageBody": f"m{i}"} for i in range(20)])
        poller = _run(["--queue-url", queue.url, "--sink", sink.url], env, tmp_path / "poller.log")
        try:
            wait_until(lambda: len(sink.events) >= len(ids), 60, "the events at the sink")
            wait_empty(sqs, queue.url)
        finally:
            code = poller.stop()
        log = poller.log_text()
    assert code == 0, log[-3000:]
    assert sorted(e["id"] for e in sink.events) == sorted(ids)
    sqs_port, sink_port = urlsplit(aws_env["AWS_ENDPOINT_URL_SQS"]).port, urlsplit(sink.url).port
    assert any(f.startswith(f"POST http://127.0.0.1:{sqs_port}/") for f in proxy.forwarded)
    assert sum(f == f"POST http://127.0.0.1:{sink_port}/" for f in proxy.forwarded) >= len(ids)
    assert proxy.tunnels == [] and proxy.refused == []
    assert f"via proxy {proxy.url}" in log and "s3cret" not in log and "s3cret" not in result.stdout


def test_run_tunnels_https_sqs_and_an_https_sink_through_connect(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """HTTPS_PROXY: SQS behind a TLS front (its private CA by --ca-bundle) and an HTTPS sink (its
    CA by SSL_CERT_FILE: the system trust the sink's connections use), both through CONNECT."""
    queue = make_queue()
    ca = PrivateCa(tmp_path / "ca")
    cert, key = ca.issue()
    with (dumper_sink() as sink, TlsFront(aws_env["AWS_ENDPOINT_URL_SQS"], cert, key) as sqs_front,
          TlsFront(sink.url, cert, key) as sink_front, ForwardProxy() as proxy):
        env = _env(aws_env, {"HTTPS_PROXY": proxy.url, "AWS_ENDPOINT_URL_SQS": sqs_front.url,
                             "SSL_CERT_FILE": str(ca.pem)})
        args = ["--queue-url", queue.url, "--sink", sink_front.url + "/", "--ca-bundle", str(ca.pem)]
        result = _check(args, env)
        assert result.returncode == 0, result.stderr
        assert f"SQS via proxy {proxy.url}, trusting the CA bundle {ca.pem}" in result.stdout
        ids = send_messages(sqs, queue.url, [{"MessageBody": f"m{i}"} for i in range(10)])
        poller = _run(args, env, tmp_path / "poller.log")
        try:
            wait_until(lambda: len(sink.events) >= len(ids), 60, "the events at the sink")
            wait_empty(sqs, queue.url)
        finally:
            code = poller.stop()
    assert code == 0, poller.log_text()[-3000:]
    assert sorted(e["id"] for e in sink.events) == sorted(ids)
    assert {f"127.0.0.1:{sqs_front.port}", f"127.0.0.1:{sink_front.port}"} == set(proxy.tunnels)
    assert proxy.forwarded == []


def test_no_proxy_sends_direct_and_check_says_so(
    make_queue: Any, aws_env: dict[str, str]
) -> None:
    queue = make_queue()
    dead = f"http://127.0.0.1:{free_port()}"
    with dumper_sink() as sink:
        for no_proxy in ("127.0.0.1", "localhost,127.0.0.0/8", f"127.0.0.1:{urlsplit(sink.url).port},"
                         f"127.0.0.1:{urlsplit(aws_env['AWS_ENDPOINT_URL_SQS']).port}"):
            result = _check(["--queue-url", queue.url, "--sink", sink.url],
                            _env(aws_env, {"HTTP_PROXY": dead, "NO_PROXY": no_proxy}))
            assert result.returncode == 0, (no_proxy, result.stderr)
            assert "SQS direct (NO_PROXY)" in result.stdout
            assert re.search(r"answered OPTIONS with HTTP \d+, direct \(NO_PROXY\)\n", result.stdout)


def test_a_dead_proxy_fails_check_and_run_in_one_line_and_nothing_goes_direct(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue()
    dead = f"http://127.0.0.1:{free_port()}"
    with dumper_sink() as sink:
        args = ["--queue-url", queue.url, "--sink", sink.url]
        env = _env(aws_env, {"HTTP_PROXY": dead})
        _one_line_error(_check(args, env), "cannot reach SQS", f"cannot connect to proxy {dead}")
        send_messages(sqs, queue.url, [{"MessageBody": "x"}])
        run = subprocess.run([sys.executable, "-m", "poller", "run", *args], env=env, capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert run.returncode == 3
        _one_line_error(run, f"cannot connect to proxy {dead}")
        # SQS direct (NO_PROXY), the sink through the dead proxy: the sink's check names the proxy.
        sqs_port = urlsplit(aws_env["AWS_ENDPOINT_URL_SQS"]).port
        result = _check(args, {**env, "no_proxy": f"127.0.0.1:{sqs_port}"})
        _one_line_error(result, "sink", f"does not answer, via proxy {dead}: ConnectionRefusedError")
        assert sink.received == []


def test_ca_bundle_without_the_sqs_ca_fails_tls(
    make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue()
    ca, other = PrivateCa(tmp_path / "ca"), PrivateCa(tmp_path / "other", "other CA")
    cert, key = ca.issue()
    with TlsFront(aws_env["AWS_ENDPOINT_URL_SQS"], cert, key) as front, dumper_sink() as sink:
        target = SqsTarget(queue_url=queue.url, region=REGION, endpoint_url=front.url, ca_bundle=str(ca.pem))
        client = BlockingSqsClient(target, timeout=5)
        try:
            assert "VisibilityTimeout" in client.queue_attributes()
        finally:
            client.close()
        client = BlockingSqsClient(SqsTarget(queue_url=queue.url, region=REGION, endpoint_url=front.url,
                                             ca_bundle=str(other.pem)), timeout=5)
        try:
            with pytest.raises(SqsError, match="CERTIFICATE_VERIFY_FAILED") as info:
                client.queue_attributes()
            assert info.value.code == "ConnectionError"
        finally:
            client.close()
        # The same through the CLI: AWS_CA_BUNDLE, and --ca-bundle before it.
        env = _env(aws_env, {"AWS_ENDPOINT_URL_SQS": front.url, "AWS_CA_BUNDLE": str(other.pem)})
        args = ["--queue-url", queue.url, "--sink", sink.url]
        failed = _check(args, env)
        assert failed.returncode == 3
        _one_line_error(failed, "cannot reach SQS", "CERTIFICATE_VERIFY_FAILED")
        result = _check([*args, "--ca-bundle", str(ca.pem)], env)
        assert result.returncode == 0, result.stderr
        assert f"SQS direct, trusting the CA bundle {ca.pem}" in result.stdout
        missing = _check([*args, "--ca-bundle", str(tmp_path / "missing.pem")], env)
        assert missing.returncode == 2
        _one_line_error(missing, f"CA bundle {tmp_path / 'missing.pem'}", "cannot be loaded")
