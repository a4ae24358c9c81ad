"""The TLS context a client verifies its server with: the system's trust plus the CAs it is given,
and a client certificate for mutual TLS.

Knative Eventing hands an HTTPS sink's CA to a SinkBinding's subject as PEM text in
``K_CA_CERTS``, and mounts the trust bundles (the ConfigMaps labelled
``networking.knative.dev/trust-bundle: "true"``) as files under ``/knative-custom-certs/``. Both
add to the system's trust, as Knative's own clients do (the system pool plus the given PEM);
verification and hostname checks stay on. Every file is read once, when the context is made
(once per process): a bad one is a one-line ``ValueError`` naming it, never its contents.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KNATIVE_TRUST_BUNDLES", "TlsFiles", "bundle_files", "client_context"]

KNATIVE_TRUST_BUNDLES = "/knative-custom-certs"
_SOURCE_LINE = re.compile(r"\s*\(_ssl\.c:\d+\)|^\[SSL\]\s*")


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """Where a client's extra trust and identity come from: paths and PEM text, picklable (an
    ``ssl.SSLContext`` is not, so each process makes its own with ``client_context``)."""

    ca_file: str | None = None  # PEM file of CA certificates
    ca_pem: str | None = field(default=None, repr=False)  # PEM text of CA certificates (K_CA_CERTS)
    bundle_dir: str | None = None  # every file in it is a PEM bundle, if the directory exists
    client_cert: str | None = None  # PEM certificate (chain), and the key too if no client_key
    client_key: str | None = None  # PEM private key, not encrypted

    def __post_init__(self) -> None:
        if self.client_key and not self.client_cert:
            raise ValueError("--sink-client-key needs --sink-client-cert")

    @property
    def any(self) -> bool:
        """Anything beyond the system's trust and no client certificate."""
        return bool(self.ca_file or self.ca_pem or self.client_cert or bundle_files(self.bundle_dir))


def bundle_files(directory: str | None) -> list[Path]:
    """The bundle files of ``directory``, sorted; none if it does not exist. A projected volume
    keeps its data under ``..data`` and dot-named entries, which are not bundles."""
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(p for p in Path(directory).iterdir() if not p.name.startswith(".") and p.is_file())


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """``ssl.create_default_context()`` plus ``files``; a one-line ValueError for a bad input."""
    context = ssl.create_default_context()
    if files.ca_file:
        _load_cas(context, files.ca_file, f"--sink-ca-file {files.ca_file}")
    if files.ca_pem and files.ca_pem.strip():
        try:
            context.load_verify_locations(cadata=files.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"K_CA_CERTS holds no valid PEM CA certificate: {_reason(exc)}") from None
    for path in bundle_files(files.bundle_dir):
        _load_cas(context, str(path), f"trust bundle {path}")
    if files.client_cert:
        what = f"--sink-client-cert {files.client_cert}" + (
            f" / --sink-client-key {files.client_key}" if files.client_key else "")
        try:
            context.load_cert_chain(files.client_cert, files.client_key or None, password=_no_password)
        except FileNotFoundError:
            raise ValueError(f"{what}: no such file") from None
        except PermissionError:
            raise ValueError(f"{what}: not readable (permission denied)") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"{what}: not a PEM certificate and its unencrypted private key "
                             f"({_reason(exc)})") from None
    return context


def _load_cas(context: ssl.SSLContext, path: str, what: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except PermissionError:
        raise ValueError(f"{what}: not readable (permission denied)") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(f"{what}: not a PEM file of CA certificates ({_reason(exc)})") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ValueError("the private key is encrypted; give an unencrypted one")


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason (``NO_CERTIFICATE_OR_CRL_FOUND``, ...) on one line, without file contents."""
    if isinstance(exc, ssl.SSLError) and exc.reason and exc.reason != "PEM_LIB":
        return str(exc.reason)
    text = _SOURCE_LINE.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
