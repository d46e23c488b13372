"""The auth file, the config keys and flags, the loopback rule, and ``pushchannel token``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import grpc
import jwt
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.config import ServerConfig
from pushchannel.config_file import load
from pushchannel.errors import InvalidArgument
from pushchannel.server.auth import (
    ADMIN,
    PUBLISH,
    SUBSCRIBE,
    AuthConfigError,
    Rights,
    check_exposure,
    is_loopback,
    load_auth_file,
    token_sha256,
)

from ..conftest import ROOT, free_port
from ..server.helpers import STEP, stub
from .conftest import AUDIENCE, AuthSpec, Keys, StartBroker, bearer, insecure_channel, write_auth_file

pytestmark = pytest.mark.timeout(60)

HEX = "a" * 64


def cli(*args: str, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "pushchannel.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- rights -------------------------------------------------------------------------------------------------
def test_globs_and_the_dead_letter_rule() -> None:
    r = Rights(publish=("orders.*", "x?"), subscribe=("hosts.*", "hosts.berlin-1.dead-letter"))
    assert r.allows(PUBLISH, "orders.eu") and r.allows(PUBLISH, "orders.eu.deep")
    assert r.allows(PUBLISH, "xy") and not r.allows(PUBLISH, "xyz") and not r.allows(PUBLISH, "orders")
    assert not r.allows(SUBSCRIBE, "orders.eu")
    assert r.allows(SUBSCRIBE, "hosts.paris-2")
    # A dead-letter channel needs a glob that itself ends in .dead-letter.
    assert not r.allows(SUBSCRIBE, "hosts.paris-2.dead-letter")
    assert r.allows(SUBSCRIBE, "hosts.berlin-1.dead-letter")
    assert not Rights(subscribe=("*",)).allows(SUBSCRIBE, "a.dead-letter")
    assert Rights(subscribe=("*.dead-letter",)).allows(SUBSCRIBE, "a.dead-letter")
    assert not Rights(publish=("*",)).allows(PUBLISH, "a.dead-letter")
    assert not r.allows(ADMIN, "") and Rights(admin=True).allows(ADMIN, "")
    assert Rights(publish=("[ab].x",)).allows(PUBLISH, "b.x")
    assert not Rights(publish=("Orders.*",)).allows(PUBLISH, "orders.x")  # case-sensitive


# -- the auth file -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[token]]\nname = "a"\nsha256 = "xyz"\n', ["auth.toml:3", "token[0].sha256", "64 hex digits"]),
        (f'[[token]]\nname = "a"\nsha256 = "{HEX}"\npublish = "x.*"\n', ["token[0].publish", "list"]),
        (f'[[token]]\nname = "a"\nsha256 = "{HEX}"\nadmin = "yes"\n', ["token[0].admin", "true or false"]),
        (f'[[token]]\nname = "a"\nsha256 = "{HEX}"\nrights = []\n', ["token[0].rights", "known keys"]),
        (f'[[token]]\nsha256 = "{HEX}"\n', ["token[0].name"]),
        (
            f'[[token]]\nname = "a"\nsha256 = "{HEX}"\n[[token]]\nname = "a"\nsha256 = "{"b" * 64}"\n',
            ["auth.toml:5", "token[1].name", "used once"],
        ),
        (
            f'[[token]]\nname = "a"\nsha256 = "{HEX}"\n[[token]]\nname = "b"\nsha256 = "{HEX.upper()}"\n',
            ["token[1].sha256", "also 'a'"],
        ),
        ("[jwt]\naudience = 'x'\n", ["jwt.hs256_secret_file"]),
        ("[jwt]\nhs256_secret_file = 'missing.secret'\n", ["cannot read", "missing.secret"]),
        ("[users]\n", ["unknown section 'users'"]),
        ("[[certificate]]\nname = 'x'\n", ["certificate[0].subject"]),
        ("token = 3\n", ["[[token]] tables"]),
        ("[[token]\n", ["not valid TOML"]),
    ],
)
def test_auth_file_errors_name_the_place(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(AuthConfigError) as info:
        load_auth_file(path)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_jwt_key_files_are_checked(tmp_path: Path, keys: Keys) -> None:
    short = tmp_path / "short.secret"
    short.write_text("too-short\n")
    auth = write_auth_file(tmp_path / "a.toml", AuthSpec(hs256=[short]))
    with pytest.raises(AuthConfigError, match="at least 32"):
        load_auth_file(auth)
    auth = write_auth_file(tmp_path / "b.toml", AuthSpec(rs256=[keys.rs256_private]))
    with pytest.raises(AuthConfigError, match="holds a private key"):
        load_auth_file(auth)
    auth = write_auth_file(tmp_path / "c.toml", AuthSpec(rs256=[keys.hs256_secret]))
    with pytest.raises(AuthConfigError, match="not a PEM public key"):
        load_auth_file(auth)
    # Several keys (rotation), relative paths from the auth file's directory.
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "new.secret").write_bytes(keys.hs256_secret.read_bytes())
    (tmp_path / "k" / "auth.toml").write_text(
        f'[jwt]\nhs256_secret_file = ["new.secret", "{keys.other_hs256_secret}"]\n'
        f'rs256_public_key_file = "{keys.rs256_public}"\nleeway = "5s"\n'
    )
    policy = load_auth_file(tmp_path / "k" / "auth.toml")
    assert policy.jwt is not None
    assert len(policy.jwt.hs256_keys) == 2 and len(policy.jwt.rs256_keys) == 1
    assert policy.jwt.leeway == 5.0 and policy.jwt.audience is None


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    auth = write_auth_file(tmp_path / "auth.toml", AuthSpec())
    auth.write_text(f'[[token]]\nname = "n"\nsha256 = "{token_sha256("s3cret")}"\npublish = ["a.*"]\n')
    policy = load_auth_file(auth)
    assert set(policy.tokens) == {hashlib.sha256(b"s3cret").hexdigest()}
    assert "s3cret" not in repr(policy)


# -- who may listen where ------------------------------------------------------------------------------------
def test_loopback_rule() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "localhost", "[::1]", "::1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "[::]", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host
    check_exposure("127.0.0.1:1", auth=False, mutual_tls=False, insecure=False)
    check_exposure("0.0.0.0:1", auth=True, mutual_tls=False, insecure=False)
    check_exposure("0.0.0.0:1", auth=False, mutual_tls=True, insecure=False)
    check_exposure("0.0.0.0:1", auth=False, mutual_tls=False, insecure=True)
    with pytest.raises(InvalidArgument, match="--insecure"):
        check_exposure("0.0.0.0:1", auth=False, mutual_tls=False, insecure=False)


def test_serve_refuses_open_address_without_auth() -> None:
    """Refused before anything binds: no port is opened."""
    got = cli("serve", "--listen", f"0.0.0.0:{free_port()}", "--store", "memory://")
    assert got.returncode == 1
    assert got.stderr.strip().splitlines()[-1].startswith("error: refusing to listen on 0.0.0.0:")
    assert "--auth" in got.stderr and "--insecure" in got.stderr and "Traceback" not in got.stderr


def test_serve_reports_bad_security_files(tmp_path: Path) -> None:
    bad = tmp_path / "auth.toml"
    bad.write_text('[[token]]\nname = "x"\nsha256 = "nope"\n')
    got = cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--store", "memory://", "--auth", str(bad))
    assert got.returncode == 1 and "auth.toml:3" in got.stderr and "Traceback" not in got.stderr
    got = cli("serve", "--store", "memory://", "--tls-cert", str(tmp_path / "c.pem"))
    assert got.returncode == 1 and "--tls-key" in got.stderr
    missing = str(tmp_path / "missing.pem")
    got = cli(
        "serve", "--listen", f"127.0.0.1:{free_port()}", "--store", "memory://", "--tls-cert", missing,
        "--tls-key", missing,
    )  # fmt: skip
    assert got.returncode == 1 and "missing.pem" in got.stderr and "Traceback" not in got.stderr


def test_config_file_security_keys(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "pushchannel.toml"
    conf.parent.mkdir()
    conf.write_text(
        'listen = "0.0.0.0:50051"\nmax_concurrent_streams = 200\nmax_metadata_size = "32KiB"\n'
        '[tls]\ncert = "tls/server.pem"\nkey = "/abs/server.key"\nclient_ca = "tls/ca.pem"\n'
        '[auth]\nfile = "auth.toml"\ninsecure = false\n'
    )
    cfg = load(conf)
    assert cfg.tls_cert == str(conf.parent / "tls" / "server.pem")
    assert cfg.tls_key == "/abs/server.key"
    assert cfg.tls_client_ca == str(conf.parent / "tls" / "ca.pem")
    assert cfg.auth_file == str(conf.parent / "auth.toml")
    assert (cfg.insecure, cfg.max_concurrent_streams, cfg.max_metadata_size) == (False, 200, 32 << 10)
    conf.write_text("[tls]\ncertificate = 'x'\n")
    with pytest.raises(ValueError, match=r"tls\.certificate"):
        load(conf)
    with pytest.raises(ValueError, match="--tls-key"):
        ServerConfig(tls_cert="a.pem")
    with pytest.raises(ValueError, match="needs TLS"):
        ServerConfig(tls_client_ca="ca.pem")


def test_serve_flags_reach_the_config(tmp_path: Path) -> None:
    got = cli(
        "serve", "--print-config", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
        "--auth", "a.toml", "--insecure", "--max-concurrent-streams", "50",
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    for key, value in (
        ("tls_cert", '"c.pem"'),
        ("tls_key", '"k.pem"'),
        ("tls_client_ca", '"ca.pem"'),
        ("auth_file", '"a.toml"'),
        ("insecure", "true"),
        ("max_concurrent_streams", "50"),
    ):
        assert f'"{key}": {value}' in got.stdout, key


# -- pushchannel token -------------------------------------------------------------------------------------
def test_token_hash() -> None:
    got = cli("token", "hash", "s3cret")
    assert got.returncode == 0 and got.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest()
    got = cli("token", "hash", stdin="from-stdin\n")
    assert got.stdout.strip() == hashlib.sha256(b"from-stdin").hexdigest()
    got = cli("token", "hash", "--generate")
    (tok_line, hash_line) = got.stdout.strip().splitlines()
    token, digest = tok_line.split()[1], hash_line.split()[1]
    assert len(token) >= 40 and digest == hashlib.sha256(token.encode()).hexdigest()
    assert cli("token", "hash", stdin="").returncode == 1


def test_token_create(keys: Keys, tmp_path: Path) -> None:
    got = cli(
        "token", "create", "--key", str(keys.hs256_secret), "--alg", "HS256", "--ttl", "30d",
        "--publish", "orders.*", "--subscribe", "hosts.berlin-1", "--subscribe", "hosts.paris-2",
        "--audience", AUDIENCE, "--subject", "saas",
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    claims = jwt.decode(
        got.stdout.strip(), keys.hs256_secret.read_bytes().strip(), algorithms=["HS256"], audience=AUDIENCE
    )
    assert claims["publish"] == ["orders.*"] and claims["subscribe"] == ["hosts.berlin-1", "hosts.paris-2"]
    assert claims["admin"] is False and claims["sub"] == "saas"
    assert 30 * 86400 - 60 < claims["exp"] - claims["iat"] <= 30 * 86400
    got = cli("token", "create", "--key", str(keys.rs256_private), "--ttl", "1h", "--admin")  # RS256 inferred
    assert got.returncode == 0, got.stderr
    assert jwt.get_unverified_header(got.stdout.strip())["alg"] == "RS256"
    claims = jwt.decode(got.stdout.strip(), keys.rs256_public.read_bytes(), algorithms=["RS256"])
    assert claims["admin"] is True
    # Refusals: one line each.
    short = tmp_path / "short.secret"
    short.write_text("short\n")
    for args, words in (
        (("--key", str(short), "--ttl", "1h", "--admin"), "at least 32"),
        (("--key", str(keys.hs256_secret), "--ttl", "1h"), "grant nothing"),
        (("--key", str(keys.hs256_secret), "--alg", "RS256", "--ttl", "1h", "--admin"), "private key"),
        (("--key", str(tmp_path / "none"), "--ttl", "1h", "--admin"), "cannot read"),
    ):
        got = cli("token", "create", *args)
        assert got.returncode == 1 and words in got.stderr and len(got.stderr.splitlines()) == 1, got.stderr
    assert cli("token", "create", "--key", str(keys.hs256_secret), "--admin").returncode == 2  # no --ttl
    assert cli("token", "create", "--key", "k", "--ttl", "-1", "--admin").returncode == 2


async def test_cli_tokens_work_on_a_broker(keys: Keys, tmp_path: Path, start_broker: StartBroker) -> None:
    """What `token create` prints is what the broker accepts, and for what it says only."""
    import asyncio

    auth = write_auth_file(
        tmp_path / "auth.toml", AuthSpec(hs256=[keys.hs256_secret], rs256=[keys.rs256_public])
    )
    server = await start_broker(auth_file=str(auth))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pushchannel.cli", "token", "create", "--key", str(keys.rs256_private),
        "--ttl", "10m", "--publish", "orders.*", "--audience", AUDIENCE,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    token = out.decode().strip()
    ch = insecure_channel(server.target)
    try:
        await stub(ch).Publish(
            pb.PublishRequest(channel="orders.eu", messages=[pb.Message(payload=b"x")]),
            metadata=bearer(token),
            timeout=STEP,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(ch).Publish(
                pb.PublishRequest(channel="hosts.x", messages=[pb.Message(payload=b"x")]),
                metadata=bearer(token),
                timeout=STEP,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close(None)
