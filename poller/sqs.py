"""All the poller's talk with Amazon SQS goes through this module.

A lean client over SQS's JSON protocol (``X-Amz-Target: AmazonSQS.<Action>``) on the event loop:
botocore resolves the endpoint and the credentials (the whole AWS chain, refreshed as they expire,
off the loop); the request is signed here (SigV4), sent through ``channels.transport.http`` (one
write per request, the answer framed by llhttp) and read with one ``orjson.loads``. Measured
here, boto3's client spends several times the CPU per message of this path, which is the hot
path of the whole poller.

``SqsClient`` is used from one event loop: its pool keeps several keep-alive connections, so
long polls, deletes and visibility changes are in flight together. ``BlockingSqsClient`` wraps it
for code without a loop. Errors come back as ``SqsError`` with SQS's error code; per-entry
failures of batch calls are returned, not raised.

A request SQS refuses for its time (our clock is off) or for an expired session token is sent
once more, re-signed: with the clock corrected by the server time SQS's error message carries,
or with credentials refreshed at once.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import hashlib
import hmac
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import botocore.session
import orjson
from botocore.configprovider import ConfiguredEndpointProvider
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import BotoCoreError
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url, validate_region_name
from mypy_extensions import mypyc_attr

from channels.base import Message
from channels.transport.http import Aborted, HttpPool, encode_headers
from channels.transport.proxy import route_for

__all__ = [
    "ACCESS_CODES", "PERMISSION_PROBES", "BatchFailure", "BlockingSqsClient", "PermissionProbe", "SqsClient",
    "SqsError", "SqsTarget", "load_credentials", "queue_url_from_arn", "region_from_queue_url",
    "region_mismatch", "resolve_target", "ssl_context",
]

log = logging.getLogger(__name__)

_IDLE_CONNECTION_LIFETIME = 5.0  # seconds; see SqsClient.__init__
_T = TypeVar("_T")

# Codes after which a retry cannot help: the call itself is wrong or not allowed.
_PERMANENT_CODES = frozenset(
    {
        "QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "AccessDenied",
        "AccessDeniedException", "InvalidClientTokenId", "UnrecognizedClientException",
        "IncompleteSignature", "MissingAuthenticationToken", "InvalidAddress", "InvalidParameterValue",
        "InvalidSecurity",
    }
)
# The request's time was refused: our clock is off (or the request was signed long before it was
# sent). The AWS SDK for Java v2 takes these (and EC2's AuthFailure) for clock skew
# (AwsErrorCode.CLOCK_SKEW_ERROR_CODES). SQS's query protocol told an expired signature as
# SignatureDoesNotMatch (aws/aws-sdk-php#642); its JSON protocol answers a bad signature with
# InvalidSignatureException (async-aws/aws#1948); its common errors list RequestExpired.
_CLOCK_CODES = frozenset(
    {
        "RequestTimeTooSkewed", "RequestExpired", "RequestInTheFuture", "SignatureDoesNotMatch",
        "InvalidSignatureException",
    }
)
# The session token expired: refresh the credentials, re-sign, retry (the AWS SDK for Go's
# credsExpiredCodes, aws/request/retryer.go, whose handlers expire the credentials and retry).
_EXPIRED_CODES = frozenset({"ExpiredToken", "ExpiredTokenException"})
# Retryable once the clock is corrected or the credentials refreshed.
_RECOVERABLE_CODES = _CLOCK_CODES | _EXPIRED_CODES
# botocore's stubs say these return bool; they return an re.Match or None. Typed as object so that
# mypyc (setup.py) does not check for a bool at run time.
_endpoint_check: Callable[[str], object] = is_valid_endpoint_url
_ipv6_endpoint_check: Callable[[str], object] = is_valid_ipv6_endpoint_url
# Codes this client makes up itself: no answer of SQS's.
_CLIENT_CODES = frozenset({"ConnectionError", "Timeout", "InvalidResponse", "InvalidRequest", "Aborted",
                           "CredentialError"})
_FORCED_REFRESH_EVERY = 10.0  # seconds between two refreshes forced by ExpiredToken, at least
# The credentials were authenticated but may not do this (IAM or the queue's policy).
ACCESS_CODES = frozenset({"AccessDenied", "AccessDeniedException"})
CREDENTIAL_CODES = frozenset(
    {
        "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
        "InvalidSignatureException", "IncompleteSignature", "MissingAuthenticationToken",
        "ExpiredToken", "ExpiredTokenException", "AccessDenied", "AccessDeniedException",
    }
)


class SqsError(Exception):
    """An SQS call failed. ``code`` is SQS's error code, or ``ConnectionError`` / ``Timeout`` /
    ``InvalidResponse`` / ``InvalidRequest`` / ``Aborted`` / ``CredentialError`` (a refresh of
    the credentials failed: retryable, the next call tries again)."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class BatchFailure:
    """One entry of a batch call that SQS did not carry out."""

    index: int
    code: str
    message: str
    sender_fault: bool


@dataclass(frozen=True, slots=True)
class PermissionProbe:
    """A permission the poller needs besides reading the queue, and the call that proves it."""

    permission: str  # IAM's name
    action: str  # the batch call the worker makes; IAM authorizes it as ``permission``


# The SQS API permissions reference: a batch action is authorized as its single action
# (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-api-permissions-reference.html).
# sqs:ReceiveMessage is not probed: a receive that is allowed takes a message (and counts toward
# its maxReceiveCount).
PERMISSION_PROBES = (
    PermissionProbe("sqs:DeleteMessage", "DeleteMessageBatch"),
    PermissionProbe("sqs:ChangeMessageVisibility", "ChangeMessageVisibilityBatch"),
)


@mypyc_attr(native_class=False)  # picklable when compiled (channels/events.py says why)
@dataclass(frozen=True, slots=True)
class SqsTarget:
    """Where and as whom to talk to SQS; resolved once in the parent, picklable for workers."""

    queue_url: str
    region: str
    endpoint_url: str
    profile: str | None = None
    ca_bundle: str | None = None  # PEM file of the CAs for SQS's certificate, instead of the system's


def resolve_target(queue_url: str, *, region: str | None, endpoint_url: str | None,
                   profile: str | None = None, ca_bundle: str | None = None) -> SqsTarget:
    """Resolve region and endpoint the AWS way (``--region``/``AWS_REGION``, ``AWS_ENDPOINT_URL_SQS``).

    The queue URL's own region comes before ``AWS_DEFAULT_REGION`` and the config file, which
    are defaults for any service: a queue of us-west-2 is never polled through us-east-1's
    endpoint because of a profile's default. An explicit region wins (see ``region_mismatch``).

    The CA bundle: ``ca_bundle`` (``--ca-bundle``), else botocore's ``ca_bundle`` setting
    (``AWS_CA_BUNDLE``, or ``ca_bundle`` in the profile), as boto3 clients take it.
    """
    # No event handlers: this session only reads settings (they took ~20 ms of the start to register).
    session = botocore.session.Session(profile=profile, include_builtin_handlers=False)
    region = region or region_from_queue_url(queue_url) or session.get_config_variable("region")
    if not region:
        raise ValueError("no AWS region: pass --region or set AWS_REGION")
    try:
        endpoint = _sqs_endpoint(session, region, endpoint_url)
    except (BotoCoreError, ValueError) as exc:
        raise ValueError(f"cannot configure SQS for region {region!r}: {exc}") from None
    return SqsTarget(queue_url=queue_url, region=region, endpoint_url=endpoint,
                     profile=profile, ca_bundle=ca_bundle or session.get_config_variable("ca_bundle") or None)


def _sqs_endpoint(session: botocore.session.Session, region: str, endpoint_url: str | None) -> str:
    """SQS's endpoint as a boto3 client takes it, without making one (measured: ~80 ms of the
    start, most of it loading every service's endpoints): the URL given, else the one configured
    (``AWS_ENDPOINT_URL_SQS``, ``AWS_ENDPOINT_URL``, the profile's; unless
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``), else SQS's endpoint rules for the region and the
    FIPS and dual-stack settings. Tests hold it to ``create_client("sqs").meta.endpoint_url``."""
    validate_region_name(region)
    if endpoint_url is None and not session.get_config_variable("ignore_configured_endpoint_urls"):
        endpoint_url = ConfiguredEndpointProvider(full_config=session.full_config,
                                                  scoped_config=session.get_scoped_config(),
                                                  client_name="sqs").provide()
    if endpoint_url is not None:
        if not (_endpoint_check(endpoint_url) or _ipv6_endpoint_check(endpoint_url)):
            raise ValueError(f"Invalid endpoint: {endpoint_url}")
        return endpoint_url
    loader = session.get_component("data_loader")
    rules = EndpointProvider(loader.load_service_model("sqs", "endpoint-rule-set-1"), loader.load_data("partitions"))
    resolved = rules.resolve_endpoint(Region=region,
                                      UseFIPS=bool(session.get_config_variable("use_fips_endpoint")),
                                      UseDualStack=bool(session.get_config_variable("use_dualstack_endpoint")))
    return str(resolved.url)


@functools.cache
def ssl_context(ca_bundle: str | None) -> ssl.SSLContext | None:
    """The TLS context for SQS with ``ca_bundle`` as the only trust (botocore's ``verify=path``
    replaces the system's CAs too); None: the transport's default. One per process and file.
    ValueError in one line if the file cannot be loaded."""
    if not ca_bundle:
        return None
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ValueError) as exc:  # missing, unreadable, no certificate in it
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"CA bundle {ca_bundle} (--ca-bundle / AWS_CA_BUNDLE) cannot be loaded: {reason}") from None


def region_mismatch(target: SqsTarget) -> str | None:
    """The queue URL's region, when it is not the region the poller talks to."""
    url_region = region_from_queue_url(target.queue_url)
    return url_region if url_region and url_region != target.region else None


def region_from_queue_url(queue_url: str) -> str | None:
    host = urlsplit(queue_url).hostname or ""
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs":  # sqs.us-east-1.amazonaws.com
        return parts[1]
    if len(parts) >= 4 and parts[1] == "queue" and parts[2] == "amazonaws":  # us-east-1.queue.amazonaws.com (legacy)
        return parts[0]
    path = urlsplit(queue_url).path.split("/")
    if len(path) >= 4 and path[1] == "queue":  # LocalStack: /queue/us-east-1/000000000000/name
        return path[2]
    return None


_ARN = re.compile(r"arn:(aws[a-z-]*):sqs:([a-z0-9-]+):(\d{12}):([A-Za-z0-9_-]{1,80}(?:\.fifo)?)")
_DOMAINS = {"aws": "amazonaws.com", "aws-cn": "amazonaws.com.cn", "aws-us-gov": "amazonaws.com"}


def queue_url_from_arn(text: str) -> str | None:
    """``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`` for a queue ARN, else None."""
    match = _ARN.fullmatch(text.strip())
    if not match:
        return None
    partition, region, account, name = match.groups()
    return f"https://sqs.{region}.{_DOMAINS.get(partition, 'amazonaws.com')}/{account}/{name}"


def load_credentials(target: SqsTarget) -> Credentials:
    """The AWS default credential chain; one lookup per process, shared by its clients."""
    session = botocore.session.Session(profile=target.profile)
    if target.ca_bundle:  # the STS and SSO clients of the chain trust what SQS's requests do
        session.set_config_variable("ca_bundle", target.ca_bundle)
    credentials = session.get_credentials()
    if credentials is None:
        raise ValueError("no AWS credentials found (environment, profile, or instance role)")
    return credentials


@functools.lru_cache(maxsize=4)
def _amz_date(second: int) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))


# Where SQS's time comes from: not a Date header (our transport hands us status and body only,
# and SQS sent none, says the AWS SDK for Java v1, which reads it out of the message instead:
# AmazonHttpClient.getServerDateFromException) but the message of its time errors, which ends
# with SQS's time:
#   "Signature expired: 20130524T000000Z is now earlier than 20130524T000500Z (20130524T001000Z - 5 min.)"
#   "Signature not yet current: 20140819T173921Z is still later than 20140819T173829Z (20140819T173329Z + 5 min.)"
_SERVER_TIME = re.compile(r"\((\d{8}T\d{6}Z) [-+] \d+ min\.?\)")


def server_time(message: str) -> float | None:
    """SQS's clock (epoch seconds) as a time error's message gives it, else None."""
    match = _SERVER_TIME.search(message)
    if match is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


class SkewedClock:
    """This host's clock corrected by ``offset``: the seconds SQS's clock is ahead of it, as SQS's
    time errors showed. One per client."""

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


class SigV4Signer:
    """SigV4 for SQS JSON-protocol POSTs.

    Hand-written, not botocore's ``SigV4Auth``: that costs ~136 us per call here (request
    objects, header canonicalisation in Python), this ~5 us (compiled), with the signing key cached per
    day. ``tests/test_sqs_signing.py`` checks it against botocore's signature.
    """

    _CONTENT_TYPE = "application/x-amz-json-1.0"

    def __init__(self, credentials: Credentials, *, region: str, host: str, path: str = "/",
                 clock: Callable[[], float] = time.time) -> None:
        self._credentials = credentials
        self._clock = clock  # epoch seconds to sign at: the client's clock, skew corrected
        self._region = region
        self._host = host  # as sent in the Host header: with the port unless it is the default
        self._path = path
        self._scope_tail = f"/{region}/sqs/aws4_request"
        self._mac: hmac.HMAC | None = None  # keyed with the signing key of _mac_for
        self._mac_for: tuple[str, str] = ("", "")

    def _signing_mac(self, day: str, secret: str) -> hmac.HMAC:
        """An HMAC keyed with the day's signing key, to ``copy()`` per request: with OpenSSL 3,
        ``hmac.new``/``hmac.digest`` look the algorithm up on every call (~1 us more each, and more
        in a busy worker: perf showed it as ~4% of a Kafka worker's CPU)."""
        if self._mac is None or self._mac_for != (day, secret):
            key = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
            for part in (self._region, "sqs", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._mac, self._mac_for = hmac.new(key, digestmod=hashlib.sha256), (day, secret)
        return self._mac

    def headers(self, action: str, body: bytes, now: time.struct_time | None = None,
                creds: ReadOnlyCredentials | None = None) -> dict[str, str]:
        """All the request's headers, ``Authorization`` included. ``creds``: frozen credentials
        (else they are frozen now)."""
        creds = creds or self._credentials.get_frozen_credentials()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", now) if now else _amz_date(int(self._clock()))
        day = amz_date[:8]
        target = "AmazonSQS." + action
        token = creds.token
        if token:
            signed = "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
            token_line = f"x-amz-security-token:{token}\n"
        else:
            signed = "content-type;host;x-amz-date;x-amz-target"
            token_line = ""
        canonical = (
            f"POST\n{self._path}\n\ncontent-type:{self._CONTENT_TYPE}\nhost:{self._host}\n"
            f"x-amz-date:{amz_date}\n{token_line}x-amz-target:{target}\n\n{signed}\n"
            + hashlib.sha256(body).hexdigest()
        )
        scope = day + self._scope_tail
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        # _freeze made sure of both keys: botocore types them as optional.
        mac = self._signing_mac(day, creds.secret_key or "").copy()
        mac.update(to_sign.encode())
        signature = mac.hexdigest()
        headers = {
            "Host": self._host,
            "Content-Type": self._CONTENT_TYPE,
            "X-Amz-Target": target,
            "X-Amz-Date": amz_date,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                f"SignedHeaders={signed}, Signature={signature}"
            ),
        }
        if token:
            headers["X-Amz-Security-Token"] = token
        return headers


class SqsClient:
    """An SQS client for one queue, on the event loop: one keep-alive connection pool (at most
    ``connections``), any number of calls in flight (long polls, deletes, visibility changes)."""

    def __init__(self, target: SqsTarget, *, timeout: float = 10.0, connections: int = 32,
                 credentials: Credentials | None = None) -> None:
        self.target = target
        self._timeout = timeout
        url = urlsplit(target.endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"SQS endpoint {target.endpoint_url!r} is not an http(s) URL")
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        self._path = url.path or "/"
        self._url = f"{url.scheme}://{url.netloc}{self._path}"
        # Connects on the first call; server_hostname (SNI, certificate check) is the host. An idle
        # connection lives 5 s, the AWS SDK for Ruby's http_idle_timeout: AWS endpoints close idle
        # ones at times of their own (aws/aws-sdk-go-v2#3423: SNS, EventBridge, maybe SQS, well
        # before Go's 90 s), and a TLS reconnect to SQS is worth sparing under the sinks' 1.5 s.
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY and the CA bundle as botocore takes them for its
        # own requests (channels.transport.proxy, resolve_target).
        self._pool = HttpPool(url.hostname, port, tls=https, limit=connections, connect_timeout=timeout,
                              keepalive_expiry=_IDLE_CONNECTION_LIFETIME,
                              ssl_context=ssl_context(target.ca_bundle) if https else None,
                              proxy=route_for(target.endpoint_url).proxy)
        self._template = self._pool.template(self._path)
        self._credentials = credentials or load_credentials(target)
        self.clock = SkewedClock()
        # The signed Host is the one the pool sends.
        self._signer = SigV4Signer(self._credentials, region=target.region, host=self._pool.authority,
                                   path=self._path, clock=self.clock.time)
        self._aborted = False
        self._queue = {"QueueUrl": target.queue_url}
        self._frozen: ReadOnlyCredentials | None = None
        self._recheck_at = 0.0
        self._refresh_lock = asyncio.Lock()  # one forced refresh at a time
        self._forced_at = -math.inf  # monotonic time of the last forced refresh

    # -- the calls ------------------------------------------------------------------------

    async def receive(self, *, max_messages: int, wait_time: int,
                      visibility_timeout: int | None = None) -> list[Message]:
        params: dict[str, Any] = {
            "QueueUrl": self.target.queue_url,
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": wait_time,
            "MessageSystemAttributeNames": ["All"],
            "AttributeNames": ["All"],
            "MessageAttributeNames": ["All"],
        }
        if visibility_timeout is not None:
            params["VisibilityTimeout"] = visibility_timeout
        answer = await self._call("ReceiveMessage", params, timeout=wait_time + self._timeout)
        return _messages(answer.get("Messages") or ())

    async def delete_batch(self, receipt_handles: Sequence[str]) -> list[BatchFailure]:
        entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(receipt_handles)]
        return _failures(await self._call("DeleteMessageBatch", {**self._queue, "Entries": entries}))

    async def change_visibility_batch(self, entries: Iterable[tuple[str, int]]) -> list[BatchFailure]:
        """``entries``: (receipt handle, new visibility timeout in seconds)."""
        body = [
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": t}
            for i, (h, t) in enumerate(entries)
        ]
        return _failures(await self._call("ChangeMessageVisibilityBatch", {**self._queue, "Entries": body}))

    async def queue_attributes(self) -> dict[str, str]:
        answer = await self._call("GetQueueAttributes", {**self._queue, "AttributeNames": ["All"]})
        return answer.get("Attributes") or {}

    async def probe(self, probe: PermissionProbe) -> str:
        """Whether these credentials may make ``probe.action`` on the queue, asked harmlessly: the
        call with a made-up receipt handle. AWS carries out a request only once it was
        authenticated and authorized (https://docs.aws.amazon.com/IAM/latest/UserGuide/access.html),
        so an answer about the handle (ReceiptHandleIsInvalid) or any other refusal of the
        request by SQS's own code means allowed, and is returned. Raises ``SqsError`` for an access or
        credential error (``ACCESS_CODES``, ``CREDENTIAL_CODES``) and for any answer that proves
        nothing (a connection error, a throttle, a 5xx, a status without an SQS error code).

        The handle cannot name a message: receipt handles are tokens SQS issues, and this one
        is plainly not one of them (and new each time)."""
        handle = f"sqs-poller-permission-check-{uuid.uuid4().hex}"
        try:
            if probe.action == "DeleteMessageBatch":
                failures = await self.delete_batch([handle])
            elif probe.action == "ChangeMessageVisibilityBatch":
                # 0: were the handle ever a message's, that message would only be visible at once
                failures = await self.change_visibility_batch([(handle, 0)])
            else:
                raise ValueError(f"no probe for {probe.action}")
        except SqsError as exc:
            if (exc.retryable or exc.code in ACCESS_CODES or exc.code in CREDENTIAL_CODES
                    or exc.code in _CLIENT_CODES or exc.code.startswith("HTTP")):
                raise
            return exc.code
        code = failures[0].code if failures else ""
        if code in ACCESS_CODES:
            raise SqsError(code, f"{probe.action}: {failures[0].message}", retryable=False)
        return code or "accepted"

    def abort(self) -> None:
        """Break off every call in progress (used to end long polls at shutdown) and refuse later
        ones. From the loop's thread.

        SQS may have handed messages to a receive that is broken off: they become visible again
        after their visibility timeout, as after a crash, so nothing is lost.
        """
        self._aborted = True
        self._pool.abort()

    def close(self) -> None:
        self._pool.close()

    # -- plumbing -------------------------------------------------------------------------

    async def _frozen_credentials(self) -> ReadOnlyCredentials:
        """The credentials to sign with, looked at again at most once a second: botocore's
        check (a lock, a timezone-aware clock) cost more than the rest of a signature."""
        now = time.monotonic()
        if self._frozen is not None and now < self._recheck_at:
            return self._frozen
        credentials = self._credentials
        if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
            # A refresh (STS, instance metadata, a credential process) blocks: not on the loop.
            frozen = await asyncio.get_running_loop().run_in_executor(None, credentials.get_frozen_credentials)
        else:
            frozen = credentials.get_frozen_credentials()
        return self._freeze(frozen)

    def _freeze(self, frozen: ReadOnlyCredentials) -> ReadOnlyCredentials:
        # They become header values: checked here, once, rather than on every request. The
        # error never shows them.
        if not frozen.access_key or not frozen.secret_key:
            raise SqsError("CredentialError", "the AWS credentials found have no access key or no secret key",
                           retryable=True)
        try:
            encode_headers({"X-Amz-Security-Token": frozen.token or "", "X-Key": frozen.access_key})
        except ValueError:
            raise SqsError("InvalidRequest", "the AWS access key or session token holds characters a "
                           "header cannot carry (CR, LF, NUL or non-latin-1)", retryable=False) from None
        self._frozen, self._recheck_at = frozen, time.monotonic() + 1.0
        return frozen

    async def _call(self, action: str, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        if self._aborted:
            raise SqsError("Aborted", f"{action}: the client was shut down", retryable=False)
        body = orjson.dumps(params)
        status, data, used = await self._send(action, body, timeout)
        if status == 200:
            return _answer(action, data)
        error = _error(action, status, data)
        if error.code in _RECOVERABLE_CODES and await self._recover(error, used):
            # Once, re-signed: with the corrected clock or the refreshed credentials. Safe: SQS
            # refused the request before acting on it.
            status, data, _ = await self._send(action, body, timeout)
            if status == 200:
                return _answer(action, data)
            error = _error(action, status, data)
        raise error

    async def _send(self, action: str, body: bytes,
                    timeout: float | None) -> tuple[int, bytes, ReadOnlyCredentials]:
        """Sign and send one request: (status, body, the credentials it was signed with)."""
        try:
            used = await self._frozen_credentials()
            headers = self._signer.headers(action, body, creds=used)
        except SqsError:
            raise
        except Exception as exc:  # noqa: BLE001 - a credential refresh failed (STS, instance metadata, a process)
            raise SqsError("CredentialError", f"{action}: cannot get AWS credentials: "
                           f"{type(exc).__name__}: {exc}", retryable=True) from None
        # Encoded as they are: every value is ours (the session token was checked when frozen).
        del headers["Host"]  # the template sends it (the same value: the pool's authority)
        request = self._template.build(body, "".join(
            [f"{name}: {value}\r\n" for name, value in headers.items()]).encode("latin-1"))
        # The pool resends once on a kept-alive connection the server closed while idle: all these
        # calls may be repeated safely.
        try:
            status, data = await self._pool.request(request, timeout=timeout or self._timeout)
        except TimeoutError:
            raise SqsError("Timeout", f"{action} got no answer from {self._url}", retryable=True) from None
        except Aborted:
            raise SqsError("Aborted", f"{action}: the client was shut down", retryable=False) from None
        except OSError as exc:  # refused, DNS, TLS, reset, ProtocolError: the connection is closed
            raise SqsError("ConnectionError", f"{action} to {self._url}: {exc}", retryable=True) from None
        if status == 407 and self._pool.proxy is not None:  # the proxy's answer, not SQS's (http:// endpoints)
            raise SqsError("ConnectionError", f"{action} to {self._url}: proxy {self._pool.proxy} answered HTTP 407 "
                           "Proxy Authentication Required", retryable=True)
        return status, data, used

    async def _recover(self, error: SqsError, used: ReadOnlyCredentials) -> bool:
        """After a time or expired-token error: whether a re-signed request may now pass."""
        if error.code in _EXPIRED_CODES:
            return await self._refresh(used)
        server = server_time(str(error))
        if server is None:  # no time to correct by (a wrong secret key, say): nothing would change
            return False
        offset = server - time.time()
        if abs(offset - self.clock.offset) >= 1.0:
            log.warning("this host's clock is %.0f s %s SQS's (%s): requests are signed with SQS's time "
                        "from now on", abs(offset), "behind" if offset > 0 else "ahead of", error.code)
        self.clock.offset = offset
        return True

    async def _refresh(self, used: ReadOnlyCredentials) -> bool:
        """Refresh the credentials now (SQS said the token expired, whatever botocore's expiry
        time says, e.g. by a skewed clock); whether there are new ones to sign with."""
        async with self._refresh_lock:
            if self._frozen is not None and self._frozen != used:
                return True  # refreshed meanwhile (by another call, or botocore itself)
            now = time.monotonic()
            if now < self._forced_at + _FORCED_REFRESH_EVERY:
                return False  # refreshed a moment ago and still expired: not in a loop
            self._forced_at = now
            try:
                frozen = await asyncio.get_running_loop().run_in_executor(None, _force_refresh, self._credentials)
            except Exception as exc:  # noqa: BLE001 - whatever the credential provider raises
                raise SqsError("CredentialError", "SQS said the session token expired; refreshing the AWS "
                               f"credentials failed: {type(exc).__name__}: {exc}", retryable=True) from None
            if frozen is None:  # static keys: nothing to refresh
                return False
            log.info("SQS said the session token expired: the credentials were refreshed")
            self._freeze(frozen)
            return frozen != used


class BlockingSqsClient:
    """``SqsClient`` for code outside an event loop (the CLI's start checks, tests, benchmarks):
    each call runs to completion on a private loop. ``abort`` may be called from another thread."""

    def __init__(self, target: SqsTarget, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = SqsClient(target, **kwargs)
        self.target = target

    def receive(self, **kwargs: Any) -> list[Message]:
        return self._run(self._client.receive(**kwargs))

    def delete_batch(self, receipt_handles: Sequence[str]) -> list[BatchFailure]:
        return self._run(self._client.delete_batch(receipt_handles))

    def change_visibility_batch(self, entries: Iterable[tuple[str, int]]) -> list[BatchFailure]:
        return self._run(self._client.change_visibility_batch(list(entries)))

    def queue_attributes(self) -> dict[str, str]:
        return self._run(self._client.queue_attributes())

    def probe(self, probe: PermissionProbe) -> str:
        return self._run(self._client.probe(probe))

    def abort(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._client.abort)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._client.close()
            self._loop.run_until_complete(asyncio.sleep(0))  # let the transports close
            # A credential refresh ran in the loop's executor: its thread ends here, not after
            # the supervisor forks its first workers (it forks only with one thread).
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def _run(self, call: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.run_until_complete(call)


def _answer(action: str, data: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise SqsError("InvalidResponse", f"{action}: the answer is not a JSON object", retryable=True)
    return answer


def _force_refresh(credentials: Credentials) -> ReadOnlyCredentials | None:
    """Refresh botocore's refreshable credentials now, whatever their expiry time says; None for
    credentials that cannot refresh (static keys). Blocks.

    botocore refreshes only by its own clock (``RefreshableCredentials._refresh``: from 15 minutes
    before the expiry time, blocking from 10) and has no public way to force a refresh; this takes
    the path ``_refresh`` itself takes, ``_protected_refresh(is_mandatory=True)`` under
    ``_refresh_lock`` (botocore/credentials.py), so a failed refresh raises rather than keeping
    the expired token.
    """
    refresh = getattr(credentials, "_protected_refresh", None)
    lock = getattr(credentials, "_refresh_lock", None)
    if not isinstance(credentials, RefreshableCredentials) or refresh is None or lock is None:
        return None
    with lock:
        refresh(is_mandatory=True)
    return credentials.get_frozen_credentials()


def error_text(exc: BaseException) -> str:
    """An error as one log line: an ``SqsError`` says what failed itself; others need their type."""
    return str(exc) if isinstance(exc, SqsError) else f"{type(exc).__name__}: {exc}"


def _messages(raw: Iterable[Any]) -> list[Message]:
    """ReceiveMessage's ``Messages`` as channel messages. One SQS never sends malformed is logged
    and skipped (it is redelivered after its visibility timeout), never a crash of the receiver."""
    messages = []
    for m in raw:
        try:
            messages.append(Message(
                id=m["MessageId"],
                body=m["Body"],
                ack_id=m["ReceiptHandle"],
                attributes=m.get("Attributes") or {},
                message_attributes=m.get("MessageAttributes") or {},
                md5_of_body=m.get("MD5OfBody", ""),
            ))
        except (KeyError, TypeError, AttributeError) as exc:
            log.error("skipping a malformed message from SQS (%s: %s); it will be redelivered",
                      type(exc).__name__, exc)
    return messages


def _failures(answer: dict[str, Any]) -> list[BatchFailure]:
    return [
        BatchFailure(
            index=int(entry.get("Id", -1)),
            code=entry.get("Code", ""),
            message=entry.get("Message", ""),
            sender_fault=bool(entry.get("SenderFault")),
        )
        for entry in answer.get("Failed") or ()
    ]


def _error(action: str, status: int, data: bytes) -> SqsError:
    try:
        doc = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    code = str(doc.get("__type", "")).rpartition("#")[2] or f"HTTP{status}"
    message = str(doc.get("message") or doc.get("Message") or "")
    retryable = code in _RECOVERABLE_CODES or (
        code not in _PERMANENT_CODES and (status >= 500 or status == 429 or "Throttl" in code))
    return SqsError(code, f"{action}: {message}" if message else action, retryable=retryable)
