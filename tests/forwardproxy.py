"""A real HTTP forward proxy for the tests (CONNECT tunnels and absolute-form requests, optional
Basic credentials), a TLS front for a plain-HTTP server, and a private CA to make certificates
with. Each server runs on its own event loop thread on 127.0.0.1 and counts what it carried."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ForwardProxy", "PrivateCa", "TlsFront"]

_HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


class _LoopServer:
    """An asyncio server on a thread of its own; ``with`` starts and stops it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def _start(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
               ssl_context: ssl.SSLContext | None = None) -> None:
        self._thread.start()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)

        self._server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class ForwardProxy(_LoopServer):
    """``tunnels``: the authorities of the CONNECTs it opened; ``forwarded``: ``METHOD URL`` of
    each absolute-form request it carried; ``refused``: requests answered 407. ``credentials``:
    (user, password) it requires; ``refuse_connect``: a status it answers every CONNECT with."""

    def __init__(self, *, credentials: tuple[str, str] | None = None, refuse_connect: int | None = None) -> None:
        super().__init__()
        self._credentials = credentials
        self._refuse_connect = refuse_connect
        self.tunnels: list[str] = []
        self.forwarded: list[str] = []
        self.refused: list[str] = []

    def __enter__(self) -> ForwardProxy:
        self._start(self._client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request; whether the client connection may carry another."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = [(name.strip(), value.strip()) for name, _, value in
                   (line.partition(":") for line in lines if line)]
        if self._credentials and not self._authorized(headers):
            self.refused.append(f"{method} {target}")
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return False
        if method == "CONNECT":
            await self._tunnel(target, reader, writer)
            return False
        return await self._forward(method, target, headers, reader, writer)

    def _authorized(self, headers: list[tuple[str, str]]) -> bool:
        assert self._credentials is not None
        expected = "Basic " + base64.b64encode(":".join(self._credentials).encode()).decode()
        return any(name.lower() == "proxy-authorization" and value == expected for name, value in headers)

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse_connect:
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self._refuse_connect)
            await writer.drain()
            return
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        self.tunnels.append(target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _forward(self, method: str, target: str, headers: list[tuple[str, str]],
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:  # origin-form: not a proxy request
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return False
        length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
        body = await reader.readexactly(length)
        self.forwarded.append(f"{method} {target}")
        up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        kept = [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP] + [("Connection", "close")]
        up_writer.write(f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
                        + "".join(f"{n}: {v}\r\n" for n, v in kept).encode("latin-1") + b"\r\n" + body)
        answer = await up_reader.read()  # to its close: Connection: close
        up_writer.close()
        answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
        status_line, *answer_lines = answer_head.decode("latin-1").split("\r\n")
        framed = [line for line in answer_lines if line.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP]
        writer.write(("\r\n".join([status_line, *framed, "Connection: close"]) + "\r\n\r\n").encode("latin-1")
                     + answer_body)
        await writer.drain()
        return False  # one request per connection: the answer's end is the connection's


class TlsFront(_LoopServer):
    """TLS on 127.0.0.1 in front of a plain-HTTP server at ``upstream`` (LocalStack, say)."""

    def __init__(self, upstream: str, cert: Path, key: Path) -> None:
        super().__init__()
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)

    def __enter__(self) -> TlsFront:
        self._start(self._client, self._context)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


class PrivateCa:
    """A CA of the test's own; ``issue`` writes a server certificate for 127.0.0.1 and localhost."""

    def __init__(self, directory: Path, name: str = "test CA") -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._name = subject
        self._cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._dir / f"{name.replace(' ', '-')}.pem"
        self.pem.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str = "server") -> tuple[Path, Path]:
        """(certificate, key) files of a server certificate signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = self._dir / f"{name}.pem", self._dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path
