"""Fixtures for the security suite: certificates and keys made in the test (trustme,
cryptography), auth files, JWTs, and brokers with TLS and auth on free loopback ports."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pushchannel.server.app import RunningServer, ServerConfig, start_server
from pushchannel.server.auth import token_sha256

from ..conftest import ROOT, TEST_BROKER, free_port, stop_process, wait_for_port

AUDIENCE = "pushchannel"
# Test channels never share a subchannel (and so a TLS session) with another test channel.
LOCAL_POOL = (("grpc.use_local_subchannel_pool", 1),)


# -- certificates ---------------------------------------------------------------------------------
@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, client certificates, and a second,
    unrelated CA with its own server and client certificates (the wrong ones)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=host-berlin-1
    client_key: Path
    other_ca: Path
    other_server_cert: Path
    other_server_key: Path
    other_client_cert: Path  # CN=host-berlin-1, but signed by the other CA
    other_client_key: Path
    stranger_cert: Path  # CN=stranger, signed by the right CA
    stranger_key: Path


def _write_issued(
    ca: trustme.CA, directory: Path, name: str, *idents: str, cn: str | None = None
) -> tuple[Path, Path]:
    cert = ca.issue_cert(*idents, common_name=cn)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    sc, sk = _write_issued(ca, directory, "server", "127.0.0.1", "localhost")
    cc, ck = _write_issued(ca, directory, "client", "host-berlin-1.example", cn="host-berlin-1")
    osc, osk = _write_issued(other, directory, "other-server", "127.0.0.1", "localhost")
    occ, ock = _write_issued(other, directory, "other-client", "host-berlin-1.example", cn="host-berlin-1")
    stc, stk = _write_issued(ca, directory, "stranger", "stranger.example", cn="stranger")
    return Pki(
        directory,
        directory / "ca.pem",
        sc,
        sk,
        cc,
        ck,
        directory / "other-ca.pem",
        osc,
        osk,
        occ,
        ock,
        stc,
        stk,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


# -- JWT keys -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Keys:
    hs256_secret: Path
    rs256_private: Path
    rs256_public: Path
    other_hs256_secret: Path  # signs tokens the broker must refuse
    other_rs256_private: Path


def _rsa_pair(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private.chmod(0o600)
    return private, public


def _secret(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(48)).decode() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("jwt-keys")
    private, public = _rsa_pair(d, "jwt")
    other_private, _ = _rsa_pair(d, "other")
    return Keys(_secret(d / "jwt.secret"), private, public, _secret(d / "other.secret"), other_private)


def sign(
    key_file: Path,
    alg: str = "HS256",
    *,
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    admin: bool = False,
    ttl: float = 3600,
    aud: str | None = AUDIENCE,
    sub: str = "test",
    nbf: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    now = time.time()
    claims: dict[str, Any] = {
        "sub": sub,
        "exp": int(now + ttl),
        "publish": list(publish),
        "subscribe": list(subscribe),
        "admin": admin,
    }
    if aud is not None:
        claims["aud"] = aud
    if nbf is not None:
        claims["nbf"] = int(nbf)
    claims.update(extra or {})
    data = key_file.read_bytes()
    key = data.strip() if alg == "HS256" else data
    return jwt.encode(claims, key, algorithm=alg)


# -- auth files ---------------------------------------------------------------------------------------
@dataclass
class StaticToken:
    name: str
    token: str
    publish: Sequence[str] = ()
    subscribe: Sequence[str] = ()
    admin: bool = False


@dataclass
class AuthSpec:
    tokens: list[StaticToken] = field(default_factory=list)
    certificates: list[dict[str, Any]] = field(default_factory=list)
    hs256: Iterable[Path] = ()
    rs256: Iterable[Path] = ()
    audience: str | None = AUDIENCE


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return _toml_list(value)
    return json.dumps(value)


def write_auth_file(path: Path, spec: AuthSpec) -> Path:
    lines: list[str] = []
    for t in spec.tokens:
        lines += [
            "[[token]]",
            f'name = "{t.name}"',
            f'sha256 = "{token_sha256(t.token)}"',
            f"publish = {_toml_list(t.publish)}",
            f"subscribe = {_toml_list(t.subscribe)}",
            f"admin = {'true' if t.admin else 'false'}",
            "",
        ]
    for c in spec.certificates:
        lines.append("[[certificate]]")
        for k, v in c.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    hs, rs = [str(p) for p in spec.hs256], [str(p) for p in spec.rs256]
    if hs or rs:
        lines.append("[jwt]")
        if hs:
            lines.append(f"hs256_secret_file = {_toml_list(hs)}")
        if rs:
            lines.append(f"rs256_public_key_file = {_toml_list(rs)}")
        if spec.audience:
            lines.append(f'audience = "{spec.audience}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# -- brokers ------------------------------------------------------------------------------------------
StartBroker = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_broker() -> AsyncIterator[StartBroker]:
    """Start in-process brokers (ServerConfig fields as keywords); all are stopped at the end."""
    running: list[RunningServer] = []

    async def start(**fields: Any) -> RunningServer:
        fields.setdefault("listen", "127.0.0.1:0")
        fields.setdefault("store_url", "memory://")
        fields.setdefault("broker", TEST_BROKER)
        fields.setdefault("grace", 0.2)
        server = await start_server(ServerConfig(**fields))
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in running:
            await server.stop(0.2)


def secure_channel(target: str, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, creds, options=LOCAL_POOL)


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=LOCAL_POOL)


# -- broker processes ---------------------------------------------------------------------------------
@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    target: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_broker(log: Path, *args: str) -> BrokerProcess:
    """``pushchannel serve`` on a free loopback port, its log in a file (a pipe nobody reads
    could fill up and stall the broker). Stop it with :func:`stop_broker`."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pushchannel.cli", "serve", "--listen", f"127.0.0.1:{port}", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        wait_for_port(port, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the broker did not start: {log.read_text(errors='replace')}") from None
    return BrokerProcess(proc, f"127.0.0.1:{port}", log)


def stop_broker(broker: BrokerProcess) -> None:
    stop_process(broker.proc)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
