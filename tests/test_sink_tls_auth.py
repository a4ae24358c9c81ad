"""The HTTP channel against sinks that check who is calling (Knative's transport encryption and
OIDC): an HTTPS sink whose certificate a private CA made here signed, mutual TLS, a bearer token
read from a file that is rotated by a symlink swap as the kubelet does, ``--sink-header``, and
bad inputs as one line.

The sinks are the message dumper on 127.0.0.1 serving TLS; the poller runs as a process against
LocalStack, as in tests/test_e2e_http.py. The in-process cases drive ``HttpChannel`` directly.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
import time
import timeit
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from channels.base import Outcome
from channels.http import HttpChannel, HttpConfig
from channels.sinkauth import TokenFile, parse_headers
from channels.transport.tls import TlsFiles
from poller.kit.cehttp import ServerOptions
from poller.kit.dumper import DumperServer

from support import PollerProcess, Reports, drain, message, send_messages, wait_empty, wait_until

SOURCE = "https://sqs.us-east-1.amazonaws.com/123456789012/q"
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/orders"  # never reached by the usage errors


# -- a private PKI, made for the test ----------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # the CA that signed the sink's certificate
    ca_pem: str
    server_cert: Path
    server_key: Path
    client_ca_file: Path  # the CA the sink trusts for client certificates
    client_cert: Path
    client_key: Path
    client_both: Path  # certificate and key in one file

    def server_context(self, *, require_client: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.client_ca_file)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(common_name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, server: bool
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("sink test CA")
    server, server_key = _leaf("127.0.0.1", ca, ca_key, server=True)
    client_ca, client_ca_key = _ca("client test CA")
    client, client_key = _leaf("sqs-poller", client_ca, client_ca_key, server=False)
    files = {
        "ca.crt": _pem(ca), "server.crt": _pem(server), "server.key": _key_pem(server_key),
        "client-ca.crt": _pem(client_ca), "client.crt": _pem(client), "client.key": _key_pem(client_key),
        "client.pem": _pem(client) + _key_pem(client_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(ca_file=directory / "ca.crt", ca_pem=_pem(ca).decode(), server_cert=directory / "server.crt",
               server_key=directory / "server.key", client_ca_file=directory / "client-ca.crt",
               client_cert=directory / "client.crt", client_key=directory / "client.key",
               client_both=directory / "client.pem")


@contextmanager
def tls_sink(context: ssl.SSLContext, **kwargs: Any) -> Iterator[DumperServer]:
    options = ServerOptions(tls=context)
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True,
                                                        server_options=options, **kwargs) as server:
        yield server


# -- the channel in this process ------------------------------------------------------------------


def deliver(config: HttpConfig, count: int = 1) -> list[tuple[str, Outcome, str]]:
    """Publish ``count`` messages through a channel made from ``config``; their reports."""

    async def run() -> list[tuple[str, Outcome, str]]:
        channel = config.create(SOURCE)
        channel.start()
        reports = Reports()
        try:
            channel.publish([message(i) for i in range(count)], reports)
            return await reports.wait(count)
        finally:
            await channel.aclose(5)

    return asyncio.run(run())


def test_an_https_sink_of_a_private_ca_fails_verification_without_it(pki: Pki) -> None:
    with tls_sink(pki.server_context()) as sink:
        [(_, outcome, reason)] = deliver(HttpConfig(sink=sink.url, timeout=5))
        assert sink.received == []
    assert outcome is Outcome.RETRY
    assert "CERTIFICATE_VERIFY_FAILED" in reason


@pytest.mark.parametrize("trust", ["ca_file", "ca_pem", "bundle_dir"])
def test_the_private_ca_adds_to_the_systems_trust(pki: Pki, trust: str, tmp_path: Path) -> None:
    if trust == "bundle_dir":  # Knative's layout: a projected ConfigMap (..data) under /knative-custom-certs
        data = tmp_path / "..2026_01_01_00_00_00.1"
        data.mkdir()
        (data / "ca.crt").write_text(pki.ca_pem)
        (tmp_path / "..data").symlink_to(data.name)
        (tmp_path / "ca.crt").symlink_to("..data/ca.crt")
        files = TlsFiles(bundle_dir=str(tmp_path))
    else:
        files = TlsFiles(**{trust: str(pki.ca_file) if trust == "ca_file" else pki.ca_pem})
    with tls_sink(pki.server_context()) as sink:
        reports = deliver(HttpConfig(sink=sink.url, timeout=5, tls=files), count=3)
        assert len(sink.received) == 3
    assert {outcome for _, outcome, _ in reports} == {Outcome.ACK}


def test_mutual_tls_needs_the_client_certificate(pki: Pki) -> None:
    with tls_sink(pki.server_context(require_client=True)) as sink:
        [(_, outcome, _)] = deliver(HttpConfig(sink=sink.url, timeout=5, tls=TlsFiles(ca_file=str(pki.ca_file))))
        assert outcome is Outcome.RETRY and sink.received == []
        for files in (TlsFiles(ca_file=str(pki.ca_file), client_cert=str(pki.client_cert),
                               client_key=str(pki.client_key)),
                      TlsFiles(ca_file=str(pki.ca_file), client_cert=str(pki.client_both))):
            [(_, outcome, reason)] = deliver(HttpConfig(sink=sink.url, timeout=5, tls=files))
            assert outcome is Outcome.ACK, reason
        assert len(sink.received) == 2


def test_headers_reach_the_sink_with_values_from_the_environment() -> None:
    headers = parse_headers(["X-Api-Key: ${TEST_SINK_KEY}", "X-Literal: $${NOT_EXPANDED}", "User-Agent: mine/1"],
                            {"TEST_SINK_KEY": "k-123"})
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True) as sink:
        [(_, outcome, _)] = deliver(HttpConfig(sink=sink.url, headers=headers))
        received = sink.received[0].headers
    assert outcome is Outcome.ACK
    assert received["x-api-key"] == "k-123"
    assert received["x-literal"] == "${NOT_EXPANDED}"
    assert received["user-agent"] == "mine/1"
    assert received["ce-id"] == "m-0"


class KubeletVolume:
    """A token file as the kubelet projects it: ``token`` -> ``..data/token``, and a rotation
    writes a new timestamped directory and renames a new ``..data`` symlink over the old one."""

    def __init__(self, directory: Path, token: str) -> None:
        self.directory = directory
        self.path = directory / "token"
        self._generation = 0
        self.rotate(token)
        self.path.symlink_to("..data/token")

    def rotate(self, token: str) -> None:
        self._generation += 1
        data = self.directory / f"..2026_01_01_00_00_{self._generation:02d}.{os.getpid()}"
        data.mkdir()
        (data / "token").write_text(token + "\n")
        staging = self.directory / "..data_tmp"
        staging.symlink_to(data.name)
        os.replace(staging, self.directory / "..data")


def test_the_token_file_is_read_again_after_a_symlink_swap(tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path, "token-one")
    token = TokenFile(str(volume.path))
    assert token.token == "token-one" and token.check() is None
    volume.rotate("token-two")
    assert token.check() == "token-two" and token.token == "token-two"
    assert token.check() is None


def test_checking_the_token_file_is_one_stat_and_costs_nothing_per_request(tmp_path: Path) -> None:
    """What the token file adds per request: a float compare (the stat runs once a second)."""
    volume = KubeletVolume(tmp_path, "token-one")
    token = TokenFile(str(volume.path))
    n = 20_000
    stat_us = timeit.timeit(token.check, number=n) / n * 1e6
    due, now = 1.0, 0.5
    guard_us = timeit.timeit("token is not None and now >= due", globals={"token": token, "now": now, "due": due},
                             number=n) / n * 1e6
    print(f"\ntoken file: one unchanged check (a stat) {stat_us:.2f} us, at most once a second; "
          f"the test on each publish {guard_us:.3f} us")
    assert stat_us < 200  # a stat, not a read: once a second is nothing


def test_a_rotated_token_is_sent_and_a_401_for_the_old_one_is_a_retry(tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path, "token-one")
    accepted = {"value": "token-one"}

    def bearer(event: dict[str, Any], headers: Mapping[str, str]) -> int | None:
        return None if headers.get("authorization") == f"Bearer {accepted['value']}" else 401

    async def run(sink: DumperServer) -> list[tuple[str, Outcome, str]]:
        channel: HttpChannel = HttpConfig(sink=sink.url, token_file=str(volume.path)).create(SOURCE)
        channel.start()
        reports = Reports()
        try:
            channel.publish([message(0)], reports)
            await reports.wait(1)
            accepted["value"] = "token-two"  # the sink moved on first: the old token is refused
            channel.publish([message(1)], reports)
            await reports.wait(2)
            volume.rotate("token-two")
            await asyncio.sleep(0.15)  # past the quick look after a 401, within the 1 s cadence
            channel.publish([message(2)], reports)
            return await reports.wait(3)
        finally:
            await channel.aclose(5)

    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True,
                                                        respond=bearer) as sink:
        reports = asyncio.run(run(sink))
    assert [outcome for _, outcome, _ in reports] == [Outcome.ACK, Outcome.RETRY, Outcome.ACK]
    assert "401" in reports[1][2]


# -- bad inputs: one line, exit 2, before SQS is asked anything ----------------------------------


def run_cli(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POLLER_", "K_SINK", "K_CA_CERTS", "AWS_"))}
    clean.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"})
    return subprocess.run([sys.executable, "-m", "poller", "run", "--queue-url", QUEUE_URL, *args],
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poller: error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--sink-ca-file", "{missing}"], {}, "--sink-ca-file {missing}: no such file"),
    (["--sink-ca-file", "{garbage}"], {}, "not a PEM file of CA certificates"),
    ([], {"K_CA_CERTS": "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----"},
     "K_CA_CERTS holds no valid PEM CA certificate"),
    (["--sink-client-cert", "{client_cert}"], {}, "not a PEM certificate and its unencrypted private key"),
    (["--sink-client-key", "{client_key}"], {}, "--sink-client-key needs --sink-client-cert"),
    (["--sink-client-cert", "{client_cert}", "--sink-client-key", "{garbage}"], {}, "--sink-client-key"),
    (["--sink-token-file", "{missing}"], {}, "--sink-token-file {missing}: no such file"),
    (["--sink-token-file", "{empty}"], {}, "the file is empty"),
    (["--sink-header", "X-Api-Key"], {}, "expected 'Name: value'"),
    # a value typed without the colon is still a value: never echoed
    (["--sink-header", "X-Api-Key=s3cr3t-typed-with-equals"], {}, "expected 'Name: value'"),
    ([], {"POLLER_SINK_HEADER": "X-Api-Key s3cr3t-typed-with-a-space"}, "expected 'Name: value'"),
    (["--sink-header", "ce-type: spoofed"], {}, "the channel sets this header itself"),
    (["--sink-header", "Content-Type: text/plain"], {}, "the channel sets this header itself"),
    (["--sink-header", "Host: elsewhere"], {}, "the channel sets this header itself"),
    (["--sink-header", "Bad Name: x"], {}, "not a valid header name"),
    (["--sink-header", "X-A: 1", "--sink-header", "x-a: 2"], {}, "given twice"),
    (["--sink-header", "X-Key: ${TEST_UNSET_VARIABLE}"], {}, "TEST_UNSET_VARIABLE is not set"),
    ([], {"POLLER_SINK_HEADER": "X-Key: ${TEST_SECRET}"}, "line break"),
    (["--sink-token-file", "{token}", "--sink-header", "Authorization: ApiKey x"], {},
     "both set the Authorization header"),
])
def test_bad_input_is_one_line_and_exit_2(pki: Pki, tmp_path: Path, args: list[str], env: dict[str, str],
                                          expected: str) -> None:
    paths = {"missing": tmp_path / "missing.pem", "garbage": tmp_path / "garbage.pem",
             "empty": tmp_path / "empty", "token": tmp_path / "token",
             "client_cert": pki.client_cert, "client_key": pki.client_key}
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "token").write_text("a-token\n")

    def fill(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(f"{{{name}}}", str(path))
        return text

    args = [fill(a) for a in args]
    secret = "s3cr3t-value\r\nX-Injected: yes"
    line = one_line_error(run_cli(["--sink", "https://127.0.0.1:9/", *args],
                                  {**env, "TEST_SECRET": secret}))
    assert fill(expected) in line
    assert "s3cr3t" not in line and "a-token" not in line


# -- end to end: LocalStack -> poller run -> the TLS sink ---------------------------------------


def poller_args(queue_url: str, sink_url: str, *extra: str) -> list[str]:
    return ["--queue-url", queue_url, "--sink", sink_url, "--processes", "1", "--wait-time", "1",
            "--stats-interval", "2", "--shutdown-timeout", "10", "--http-timeout", "5", *extra]


@pytest.mark.integration
def test_a_private_ca_through_k_ca_certs_and_through_the_file(
    pki: Pki, sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path,
) -> None:
    queue = make_queue(visibility_timeout=5)
    with tls_sink(pki.server_context()) as sink:
        ids = send_messages(sqs, queue.url, [f"m{i}" for i in range(20)])
        # Without the CA: verification fails, nothing reaches the sink, every message stays.
        poller = PollerProcess(poller_args(queue.url, sink.url), aws_env, tmp_path / "none.log",
                               unset=("K_CA_CERTS",))
        try:
            wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in poller.log_text(), 60, "the verification to fail")
        finally:
            assert poller.stop() == 0
        assert sink.received == []
        # Knative's K_CA_CERTS: PEM text in the environment.
        poller = PollerProcess(poller_args(queue.url, sink.url), {**aws_env, "K_CA_CERTS": pki.ca_pem},
                               tmp_path / "env.log")
        try:
            wait_until(lambda: {e["id"] for e in sink.events} >= set(ids), 60, "the events through K_CA_CERTS")
            wait_empty(sqs, queue.url, 30)
        finally:
            assert poller.stop() == 0
        assert "trusting K_CA_CERTS beside the system's CAs" in poller.log_text()
        # --sink-ca-file
        more = send_messages(sqs, queue.url, [f"n{i}" for i in range(20)])
        poller = PollerProcess(poller_args(queue.url, sink.url, "--sink-ca-file", str(pki.ca_file)), aws_env,
                               tmp_path / "file.log", unset=("K_CA_CERTS",))
        try:
            wait_until(lambda: {e["id"] for e in sink.events} >= set(more), 60, "the events through --sink-ca-file")
            wait_empty(sqs, queue.url, 30)
        finally:
            assert poller.stop() == 0


@pytest.mark.integration
def test_mutual_tls_and_headers_from_the_environment(
    pki: Pki, sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path,
) -> None:
    queue = make_queue(visibility_timeout=5)

    def api_key(event: dict[str, Any], headers: Mapping[str, str]) -> int | None:
        return None if headers.get("x-api-key") == "key-from-a-secret" and headers.get("x-team") == "orders" else 403

    env = {**aws_env, "POLLER_SINK_CLIENT_CERT": str(pki.client_cert), "POLLER_SINK_CLIENT_KEY": str(pki.client_key),
           "POLLER_SINK_CA_FILE": str(pki.ca_file), "TEST_API_KEY": "key-from-a-secret",
           "POLLER_SINK_HEADER": "X-Api-Key: ${TEST_API_KEY}\nX-Team: orders\n"}
    with tls_sink(pki.server_context(require_client=True), respond=api_key) as sink:
        ids = send_messages(sqs, queue.url, [f"m{i}" for i in range(30)])
        poller = PollerProcess(poller_args(queue.url, sink.url), env, tmp_path / "poller.log")
        try:
            wait_until(lambda: {e["id"] for e in sink.events} >= set(ids), 60, "the events over mutual TLS")
            wait_empty(sqs, queue.url, 30)
        finally:
            assert poller.stop() == 0
        check = subprocess.run([sys.executable, "-m", "poller", "check", "--queue-url", queue.url,
                                "--sink", sink.url], env={**os.environ, **env}, capture_output=True,
                               text=True, timeout=60)
    assert sink.counts.refused == 0
    log = poller.log_text()
    assert "client certificate" in log and "headers X-Api-Key, X-Team" in log
    assert "key-from-a-secret" not in log
    # poller check's probe makes the same TLS connection (the sink requires the client certificate).
    assert check.returncode == 0, check.stdout + check.stderr
    assert "answered OPTIONS with HTTP" in check.stdout
    assert "key-from-a-secret" not in check.stdout + check.stderr


@pytest.mark.integration
def test_a_token_rotated_mid_run_loses_nothing_and_sends_nothing_to_the_dlq(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path,
) -> None:
    (tmp_path / "oidc").mkdir()
    volume = KubeletVolume(tmp_path / "oidc", "old-token-1111")
    queue = make_queue(visibility_timeout=5, dlq_max_receive_count=2)
    accepted = {"value": "old-token-1111"}
    seen: list[str] = []
    lock = threading.Lock()

    def bearer(event: dict[str, Any], headers: Mapping[str, str]) -> int | None:
        sent = headers.get("authorization", "")
        with lock:
            seen.append(sent)
        return None if sent == f"Bearer {accepted['value']}" else 401

    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True,
                                                        respond=bearer) as sink:
        args = poller_args(queue.url, sink.url, "--sink-token-file", str(volume.path),
                           "--sink-header", "X-Source: sqs")
        poller = PollerProcess(args, aws_env, tmp_path / "poller.log")
        try:
            poller.wait_for_workers(1)
            ids: list[str] = []
            sender_done = threading.Event()

            def keep_sending() -> None:
                for n in range(30):
                    ids.extend(send_messages(sqs, queue.url, [f"m{n}-{i}" for i in range(10)]))
                    time.sleep(0.1)
                sender_done.set()

            sender = threading.Thread(target=keep_sending)
            sender.start()
            wait_until(lambda: len(sink.received) >= 50, 60, "events with the first token")
            # The sink trusts the new token first (its old one is refused: 401), then the kubelet
            # swaps the projected volume's ..data symlink.
            accepted["value"] = "new-token-2222"
            time.sleep(0.5)
            volume.rotate("new-token-2222")
            sender.join()
            wait_until(lambda: {e["id"] for e in sink.events} >= set(ids), 90, "every event")
            wait_empty(sqs, queue.url, 60)
        finally:
            assert poller.stop() == 0
    assert len(ids) == 300
    assert drain(sqs, queue.dlq_url, idle_receives=1) == []
    with lock:
        refused = [s for s in seen if s == "Bearer old-token-1111"]
        assert refused, "the rotation did not meet a 401: the test proved nothing"
        assert seen[-1] == "Bearer new-token-2222"
    assert all(r.headers["x-source"] == "sqs" for r in sink.received)
    log = poller.log_text()
    assert "old-token-1111" not in log and "new-token-2222" not in log
    assert "changed: the new token is sent from now on" in log
    assert " rejected 0 " in log.splitlines()[-1]  # the supervisor's last line: nothing was rejected


# -- deploy/knative/ shows how the token gets there -------------------------------------------


def test_the_knative_deployment_sends_a_projected_token_for_the_sinks_audience() -> None:
    import yaml

    knative = Path(__file__).resolve().parent.parent / "deploy" / "knative"
    deployment = yaml.safe_load((knative / "deployment.yaml").read_text())
    binding = yaml.safe_load((knative / "sinkbinding.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    token_file = next(e["value"] for e in container["env"] if e["name"] == "POLLER_SINK_TOKEN_FILE")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [(name, path)] = [(n, p) for n, p in mounts.items() if token_file.startswith(p.rstrip("/") + "/")]
    assert name != "oidc-token", "the SinkBinding removes a volume of that name from its subject"
    [source] = volumes[name]["projected"]["sources"]
    projection = source["serviceAccountToken"]
    assert f"{path.rstrip('/')}/{projection['path']}" == token_file
    assert projection["audience"] == binding["spec"]["sink"]["audience"]
    assert 600 <= projection["expirationSeconds"] <= 86400
