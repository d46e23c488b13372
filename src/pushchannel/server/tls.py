"""TLS and mutual TLS on the gRPC port, with certificates that reload on SIGHUP.

The server's credentials are gRPC's *dynamic* SSL credentials: gRPC asks :meth:`ServerTls._fetch`
for the certificate configuration at every new TLS handshake. :meth:`ServerTls.reload` (the
SIGHUP handler) reads and checks the files at once and, if they are good, hands the new
configuration to the next handshake; connections already open keep the certificate they were
made with, so no stream is dropped. Bad files on reload are logged and the old certificate is
kept.

The same module builds the client side's credentials from ``--tls-ca/--tls-cert/--tls-key``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from pushchannel.errors import InvalidArgument

__all__ = ["ServerTls", "TlsError", "client_credentials", "load_server_files"]

log = logging.getLogger("pushchannel.server")


class TlsError(InvalidArgument):
    """A certificate, key or CA file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """The bytes of one server certificate configuration, checked to belong together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"the {what} {path} is not PEM (no '-----BEGIN' line)")
    return data


def load_server_files(cert: str | Path, key: str | Path, client_ca: str | Path | None) -> ServerFiles:
    """Read the files and check them with the ``ssl`` module (the key must match the
    certificate, the CA file must hold certificates) so a bad file fails here, with its name,
    and not at the first handshake."""
    cert_pem = _read(cert, "TLS certificate")
    key_pem = _read(key, "TLS private key")
    ca_pem = _read(client_ca, "TLS client CA file") if client_ca else None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"the TLS certificate {cert} and key {key} do not make a usable pair: {exc}") from None
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"the TLS client CA file {client_ca} holds no usable certificate: {exc}") from None
    return ServerFiles(cert_pem, key_pem, ca_pem)


def _configuration(files: ServerFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(files.key, files.cert)], root_certificates=files.client_ca
    )


class ServerTls:
    """The server's TLS credentials; ``reload()`` swaps the certificate for new connections."""

    def __init__(self, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._initial = load_server_files(cert, key, client_ca)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # gRPC calls _fetch from its own threads
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._initial),
            self._fetch,  # type: ignore[arg-type]  # None means "keep the current one"
            require_client_authentication=self.mutual,
        )

    def reload(self) -> bool:
        """Re-read the files now; True if new connections will get them, False (logged) if
        they were unusable and the current certificate stays."""
        try:
            files = load_server_files(self.cert, self.key, self.client_ca)
        except TlsError as exc:
            log.error(
                "TLS reload failed, keeping the current certificate: %s",
                exc,
                extra={"event": "reload_failed"},
            )
            return False
        with self._lock:
            self._pending = _configuration(files)
            self.reloads += 1
        log.info(
            "TLS certificate reloaded from %s: new connections get it",
            self.cert,
            extra={"event": "tls_reloaded"},
        )
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetch callback, at each handshake: the new configuration once after a
        reload, otherwise None (keep the one in use)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def client_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for ``AsyncClient(tls=...)``: ``ca`` to trust (default: the system's
    roots), and ``cert`` + ``key`` for mutual TLS."""
    if (cert is None) != (key is None):
        raise TlsError(
            "a client certificate needs its key, and a key its certificate (--tls-cert with --tls-key)"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA file") if ca else None,
        private_key=_read(key, "TLS client key") if key else None,
        certificate_chain=_read(cert, "TLS client certificate") if cert else None,
    )
