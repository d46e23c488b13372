"""Who may do what: bearer tokens (static or JWT), client certificates, rights by channel glob.

The ``--auth`` file (TOML, SPEC §7) lists static tokens by their SHA-256, optional client
certificate subjects (mutual TLS), and an optional ``[jwt]`` section with the keys that sign
JWTs::

    [[token]]
    name = "saas-backend"            # shows in logs instead of the token
    sha256 = "9f86d081884c7d65..."   # sha256 hex of the token's UTF-8 bytes
    publish = ["hosts.*"]            # channel globs (fnmatch: * ? [..])
    subscribe = []
    admin = false

    [[certificate]]                  # mutual TLS: the client certificate as identity
    subject = "host-berlin-1"        # the certificate's CN, or its whole subject "CN=...,O=..."
    subscribe = ["hosts.berlin-1"]

    [jwt]                            # claims: publish, subscribe, admin, exp (required), nbf, aud, sub
    hs256_secret_file = "jwt.secret" # and/or rs256_public_key_file = "jwt.pub"; a list for rotation
    audience = "pushchannel"
    leeway = "0s"                    # clock skew allowed on exp and nbf

Relative paths are relative to the auth file. Rules (docs/security.md):

- no token, an unknown, malformed or expired one → ``UNAUTHENTICATED``;
- a channel outside the holder's globs → ``PERMISSION_DENIED``; ``admin`` grants the admin
  RPCs (it grants no channel);
- a dead-letter channel ``X.dead-letter`` is matched only by globs that end in
  ``.dead-letter`` themselves: a right to ``hosts.*`` does not cover ``hosts.a.dead-letter``;
- a stream lives no longer than its token: it is closed with ``UNAUTHENTICATED`` when the
  token expires, and when a reload (SIGHUP) revokes the token or the right it was opened with.

Failures are logged one line each (the token's name, never the token), rate-limited.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import translate
from pathlib import Path
from typing import Any, Literal, TypeVar

from grpc import aio

from pushchannel.errors import InvalidArgument, PermissionDenied, PushChannelError, Unauthenticated
from pushchannel.server.guard import CURRENT_CONTEXT, CURRENT_METHOD
from pushchannel.server.logs import log_auth_failure

__all__ = [
    "ADMIN",
    "PUBLISH",
    "SUBSCRIBE",
    "AuthConfigError",
    "AuthPolicy",
    "Authorizer",
    "Principal",
    "Rights",
    "check_exposure",
    "is_loopback",
    "load_auth_file",
]

log = logging.getLogger("pushchannel.auth")

Action = Literal["publish", "subscribe", "admin"]
PUBLISH: Action = "publish"
SUBSCRIBE: Action = "subscribe"
ADMIN: Action = "admin"
DEAD_LETTER_SUFFIX = ".dead-letter"
MIN_HS256_SECRET = 32  # bytes (RFC 7518 §3.2)
MIN_RSA_BITS = 2048
MAX_PATTERN = 512
_CACHE_SIZE = 4096
_LOG_CHANNEL = 80  # characters of a (not yet validated) channel name in a log line

T = TypeVar("T")
Context = aio.ServicerContext[Any, Any]


class AuthConfigError(InvalidArgument):
    """An auth file (or key file) that cannot be used; the message names the file."""


# -- rights ---------------------------------------------------------------------------------------
def _compile(patterns: Iterable[str]) -> tuple[tuple[re.Pattern[str], bool], ...]:
    return tuple((re.compile(translate(p)), p.endswith(DEAD_LETTER_SUFFIX)) for p in patterns)


@dataclass(frozen=True, slots=True)
class Rights:
    """Channel globs for publish and subscribe, and whether the admin RPCs are allowed."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: bool = False
    _pub: tuple[tuple[re.Pattern[str], bool], ...] = field(init=False, repr=False, compare=False)
    _sub: tuple[tuple[re.Pattern[str], bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pub", _compile(self.publish))
        object.__setattr__(self, "_sub", _compile(self.subscribe))

    def allows(self, action: Action, channel: str) -> bool:
        if action == ADMIN:
            return self.admin
        dead = channel.endswith(DEAD_LETTER_SUFFIX)
        for regex, for_dead in self._pub if action == PUBLISH else self._sub:
            if (for_dead or not dead) and regex.match(channel):
                return True
        return False


EVERYTHING = Rights(("*", "*" + DEAD_LETTER_SUFFIX), ("*", "*" + DEAD_LETTER_SUFFIX), True)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a name for logs, its rights, when it expires (unix s)."""

    name: str
    rights: Rights
    expires: float | None = None
    kind: Literal["token", "jwt", "certificate", "anonymous"] = "token"
    credential: str = field(default="", repr=False, compare=False)  # to re-check after a reload
    generation: int = field(default=0, repr=False, compare=False)


ANONYMOUS = Principal("anonymous", EVERYTHING, kind="anonymous")


# -- the auth file ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JwtSettings:
    hs256_keys: tuple[bytes, ...] = ()
    rs256_keys: tuple[Any, ...] = ()  # cryptography RSAPublicKey objects
    audience: str | None = None
    leeway: float = 0.0


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """A parsed auth file."""

    tokens: Mapping[str, Principal] = field(default_factory=dict)  # sha256 hex -> principal
    certificates: Mapping[str, Principal] = field(default_factory=dict)  # subject or CN -> principal
    jwt: JwtSettings | None = None


_TOKEN_KEYS = {"name", "sha256", "publish", "subscribe", "admin"}
_CERT_KEYS = {"subject", "name", "publish", "subscribe", "admin"}
_JWT_KEYS = {"hs256_secret_file", "rs256_public_key_file", "audience", "leeway"}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _line_of(text: str, table: str, index: int, key: str) -> int:
    """The line where ``key`` is set in the ``index``-th ``[table]``/``[[table]]`` (0: unknown)."""
    seen, current = -1, None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            current = line.strip("[] ")
            if current == table:
                seen += 1
        elif current == table and seen == index and re.match(rf"{re.escape(key)}\s*=", line):
            return n
    return 0


class _FileReader:
    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def error(self, table: str, index: int, key: str, expected: str) -> AuthConfigError:
        line = _line_of(self.text, table, index, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        label = f"{table}[{index}].{key}" if table in ("token", "certificate") else f"{table}.{key}"
        return AuthConfigError(f"{where}: {label}: expected {expected}")

    def globs(self, table: str, index: int, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(p, str) and 0 < len(p) <= MAX_PATTERN for p in value
        ):
            raise self.error(table, index, key, 'a list of channel globs such as ["hosts.*"]')
        return tuple(value)

    def rights(self, table: str, index: int, data: Mapping[str, Any]) -> Rights:
        admin = data.get("admin", False)
        if not isinstance(admin, bool):
            raise self.error(table, index, "admin", "true or false")
        return Rights(
            self.globs(table, index, data, "publish"), self.globs(table, index, data, "subscribe"), admin
        )

    def unknown(self, table: str, index: int, data: Mapping[str, Any], keys: set[str]) -> None:
        for key in data:
            if key not in keys:
                known = ", ".join(sorted(keys))
                raise self.error(table, index, key, f"one of the known keys ({known}), not {key!r}")

    def tables(self, data: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise AuthConfigError(f"{self.path}: {name}: expected [[{name}]] tables")
        return value

    def files(self, jwt: Mapping[str, Any], key: str) -> list[Path]:
        value = jwt.get(key, [])
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise self.error("jwt", 0, key, "a file name, or a list of file names (key rotation)")
        return [self.path.parent / n for n in names]


def _read_key(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    return data


def read_hs256_secret(path: str | Path) -> bytes:
    """An HS256 secret file: its bytes without surrounding whitespace, at least 32 of them."""
    path = Path(path)
    secret = _read_key(path, "JWT secret file").strip()
    if len(secret) < MIN_HS256_SECRET:
        raise AuthConfigError(
            f"the JWT secret in {path} is {len(secret)} bytes; HS256 needs at least "
            f"{MIN_HS256_SECRET} (e.g. 'openssl rand -base64 48 > {path.name}')"
        )
    try:
        if path.stat().st_mode & 0o077:
            log.warning("the JWT secret file %s is readable by others than its owner (chmod 600)", path)
    except OSError:  # pragma: no cover
        pass
    return secret


def read_rs256_public_key(path: str | Path) -> Any:
    """An RS256 public key (PEM); a private key is refused: the broker needs only the public half."""
    path = Path(path)
    pem = _read_key(path, "JWT public key file")
    if b"PRIVATE KEY" in pem:
        raise AuthConfigError(
            f"{path} holds a private key: give the broker only the public key "
            f"(openssl pkey -in {path.name} -pubout -out jwt.pub)"
        )
    try:
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise AuthConfigError(
            "RS256 needs the 'cryptography' package: pip install 'pushchannel[jwt]'"
        ) from None
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise AuthConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, RSAPublicKey):
        raise AuthConfigError(f"{path} is not an RSA public key (RS256 needs one)")
    if key.key_size < MIN_RSA_BITS:
        raise AuthConfigError(f"the RSA key in {path} has {key.key_size} bits; RS256 needs {MIN_RSA_BITS}+")
    return key


def load_auth_file(path: str | Path, generation: int = 0) -> AuthPolicy:
    """Parse and check an auth file; AuthConfigError says what is wrong and where."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthConfigError(f"{path}: cannot read the auth file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"{path}: not valid TOML: {exc}") from None
    r = _FileReader(path, text)
    for key in data:
        if key not in ("token", "certificate", "jwt"):
            raise AuthConfigError(
                f"{path}: unknown section {key!r} (expected [[token]], [[certificate]], [jwt])"
            )
    tokens: dict[str, Principal] = {}
    names: set[str] = set()
    for i, t in enumerate(r.tables(data, "token")):
        r.unknown("token", i, t, _TOKEN_KEYS)
        name, digest = t.get("name"), t.get("sha256")
        if not isinstance(name, str) or not name:
            raise r.error("token", i, "name", 'a name for the logs, such as "saas-backend"')
        if name in names:
            raise r.error("token", i, "name", f"a name used once, not {name!r} again")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise r.error("token", i, "sha256", "64 hex digits (pushchannel token hash TOKEN)")
        digest = digest.lower()
        if digest in tokens:
            raise r.error("token", i, "sha256", f"a token listed once (it is also {tokens[digest].name!r})")
        names.add(name)
        tokens[digest] = Principal(
            name, r.rights("token", i, t), kind="token", credential=digest, generation=generation
        )
    certificates: dict[str, Principal] = {}
    for i, c in enumerate(r.tables(data, "certificate")):
        r.unknown("certificate", i, c, _CERT_KEYS)
        subject = c.get("subject")
        if not isinstance(subject, str) or not subject:
            raise r.error("certificate", i, "subject", "the client certificate's CN or subject")
        if subject in certificates:
            raise r.error("certificate", i, "subject", f"a subject listed once, not {subject!r} again")
        name = c.get("name", subject)
        if not isinstance(name, str) or not name:
            raise r.error("certificate", i, "name", "a name for the logs")
        certificates[subject] = Principal(
            name, r.rights("certificate", i, c), kind="certificate", generation=generation
        )
    jwt_settings = None
    if "jwt" in data:
        j = data["jwt"]
        if not isinstance(j, dict):
            raise AuthConfigError(f"{path}: jwt: expected a [jwt] table")
        r.unknown("jwt", 0, j, _JWT_KEYS)
        hs = r.files(j, "hs256_secret_file")
        rs = r.files(j, "rs256_public_key_file")
        if not hs and not rs:
            raise r.error("jwt", 0, "hs256_secret_file", "hs256_secret_file and/or rs256_public_key_file")
        audience = j.get("audience")
        if audience is not None and (not isinstance(audience, str) or not audience):
            raise r.error("jwt", 0, "audience", 'a string such as "pushchannel"')
        leeway = j.get("leeway", 0)
        try:
            from pushchannel.config_file import parse_duration

            leeway_s = parse_duration(leeway)
        except ValueError as exc:
            raise r.error("jwt", 0, "leeway", str(exc)) from None
        try:
            import jwt  # noqa: F401
        except ImportError:
            raise AuthConfigError(
                f"{path}: the [jwt] section needs PyJWT: pip install 'pushchannel[jwt]'"
            ) from None
        jwt_settings = JwtSettings(
            tuple(read_hs256_secret(p) for p in hs),
            tuple(read_rs256_public_key(p) for p in rs),
            audience,
            leeway_s,
        )
    return AuthPolicy(tokens, certificates, jwt_settings)


def token_sha256(token: str) -> str:
    """What the auth file stores for a static token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _Named(Unauthenticated):
    """An authentication failure that knows whose (for the log line only)."""

    def __init__(self, message: str, name: str | None) -> None:
        super().__init__(message)
        self.name = name


# -- JWT ------------------------------------------------------------------------------------------
def _claim_globs(claims: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = claims.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(p, str) and 0 < len(p) <= MAX_PATTERN for p in value
    ):
        raise Unauthenticated(f"the token's {key!r} claim is not a list of channel globs")
    return tuple(value)


def _verify_jwt(settings: JwtSettings, token: str, generation: int) -> Principal:
    import jwt

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthenticated("the token is neither a known token nor a well-formed JWT") from None
    alg = header.get("alg")
    keys: Sequence[Any] = {"HS256": settings.hs256_keys, "RS256": settings.rs256_keys}.get(str(alg), ())
    if not keys:
        raise Unauthenticated(f"JWTs signed with {alg!r} are not accepted here")
    options: dict[str, Any] = {"require": ["exp"], "verify_aud": settings.audience is not None}
    if settings.audience is not None:
        options["require"].append("aud")
    claims: dict[str, Any] | None = None
    for key in keys:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=settings.audience,
                options=options,  # type: ignore[arg-type]
                leeway=settings.leeway,
            )
            break
        except jwt.InvalidSignatureError:
            continue  # another key of the rotation may have signed it
        except jwt.ExpiredSignatureError:
            raise _Named("the token expired: get a new one", _unverified_subject(token)) from None
        except jwt.ImmatureSignatureError:
            raise _Named("the token is not valid yet (nbf)", _unverified_subject(token)) from None
        except jwt.InvalidAudienceError:
            msg = f"the token is not for this broker (audience {settings.audience!r})"
            raise _Named(msg, _unverified_subject(token)) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _Named(f"the token has no {exc.claim!r} claim", _unverified_subject(token)) from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token is not a valid JWT: {exc}") from None
    if claims is None:
        raise Unauthenticated("the token's signature does not verify with any configured key")
    admin = claims.get("admin", False)
    if not isinstance(admin, bool):
        raise Unauthenticated("the token's 'admin' claim is not true or false")
    rights = Rights(_claim_globs(claims, "publish"), _claim_globs(claims, "subscribe"), admin)
    sub = claims.get("sub")
    name = f"jwt:{sub}" if isinstance(sub, str) and sub else "jwt"
    return Principal(name, rights, float(claims["exp"]), "jwt", token, generation)


def _unverified_subject(token: str) -> str:
    """For a log line about a token whose signature verified but whose claims did not."""
    try:
        import jwt

        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except Exception:
        return "jwt"
    return f"jwt:{str(sub)[:64]}" if sub else "jwt"


# -- failures in the log -----------------------------------------------------------------------------
Code = Literal["UNAUTHENTICATED", "PERMISSION_DENIED"]


class _FailureLog:
    """One structured line per refused call (``event=auth_failed``: peer, method, token name,
    channel, reason; never the token), at most ``per_second`` a second, so that a flood of bad
    calls cannot flood the log; the rest are counted in one line."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self._window = 0
        self._count = 0
        self._suppressed = 0

    def __call__(
        self,
        reason: str,
        *,
        code: Code = "UNAUTHENTICATED",
        name: str = "",
        channel: str = "",
        context: Context | None = None,
    ) -> None:
        now = int(time.monotonic())
        if now != self._window:
            if self._suppressed:
                log.warning(
                    "auth failures not logged",
                    extra={"event": "auth_failed_suppressed", "count": self._suppressed},
                )
            self._window, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count > self.per_second:
            self._suppressed += 1
            return
        log_auth_failure(
            _peer(context if context is not None else CURRENT_CONTEXT.get()),
            CURRENT_METHOD.get(),
            reason,
            code=code,
            token_name=name,
            channel=_printable(channel),
        )


def _peer(context: Context | None) -> str:
    try:
        return context.peer() if context is not None else "-"
    except Exception:  # pragma: no cover
        return "-"


def _printable(channel: str) -> str:
    """A channel name (not validated yet: anything) fit for a log line."""
    cut = channel[:_LOG_CHANNEL]
    shown = "".join(c if c.isprintable() else "?" for c in cut)
    return shown + "..." if len(channel) > _LOG_CHANNEL else shown


def _shown(channel: str) -> str:
    return repr(channel if len(channel) <= _LOG_CHANNEL else channel[:_LOG_CHANNEL] + "...")


# -- the authorizer ---------------------------------------------------------------------------------
class Watch:
    """A stream under watch: closed when its token expires or a reload revokes it."""

    __slots__ = ("_registry", "action", "channel", "close", "context", "principal", "timer")

    def __init__(
        self,
        principal: Principal,
        action: Action,
        channel: str,
        close: Callable[[PushChannelError], None],
        registry: set[Watch] | None = None,
    ) -> None:
        self.principal, self.action, self.channel, self.close = principal, action, channel, close
        self.timer: asyncio.TimerHandle | None = None
        self.context = CURRENT_CONTEXT.get()  # the call it watches, for the log line
        self._registry = registry

    def cancel(self) -> None:
        """The stream ended: stop watching it."""
        if self._registry is not None:
            self._registry.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_NO_WATCH = Watch(ANONYMOUS, ADMIN, "", lambda exc: None)


class Authorizer:
    """Authenticates calls and checks rights; one per server, shared by both services.

    Disabled (no auth file) it lets everything through: then only the listen address (loopback)
    or mutual TLS keep strangers out (see :func:`check_exposure`).
    """

    def __init__(self, policy: AuthPolicy | None = None, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._policy = policy
        self._generation = 0
        self._cache: dict[str, Principal] = {}
        self._watches: set[Watch] = set()
        self._fail = _FailureLog()
        self.failures = 0  # counted for metrics and tests

    @classmethod
    def from_file(cls, path: str | Path) -> Authorizer:
        return cls(load_auth_file(path), path)

    @property
    def enabled(self) -> bool:
        return self._policy is not None

    @property
    def policy(self) -> AuthPolicy | None:
        return self._policy

    # -- reload (SIGHUP) ---------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the auth file: new calls see it at once, and streams whose token (or right)
        it no longer grants are closed with UNAUTHENTICATED / PERMISSION_DENIED. A bad file is
        logged and the current one stays. True if the new file is in force."""
        if self.path is None:
            return False
        try:
            policy = load_auth_file(self.path, self._generation + 1)
        except AuthConfigError as exc:
            log.error(
                "auth reload failed, keeping the current rules: %s", exc, extra={"event": "reload_failed"}
            )
            return False
        self._generation += 1
        self._policy = policy
        self._cache.clear()
        closed = 0
        for watch in list(self._watches):
            try:
                self._recheck(watch.principal, watch.action, watch.channel)
            except PushChannelError as exc:
                self._fail(
                    f"{exc} (stream closed after a reload)",
                    code="UNAUTHENTICATED" if isinstance(exc, Unauthenticated) else "PERMISSION_DENIED",
                    name=watch.principal.name,
                    channel=watch.channel,
                    context=watch.context,
                )
                watch.cancel()
                watch.close(exc)
                closed += 1
        log.info(
            "auth rules reloaded from %s: %d tokens, %d certificates, jwt %s; %d streams closed",
            self.path,
            len(policy.tokens),
            len(policy.certificates),
            "on" if policy.jwt else "off",
            closed,
            extra={"event": "auth_reloaded"},
        )
        return True

    def _recheck(self, principal: Principal, action: Action, channel: str) -> Principal:
        if principal.kind == "certificate":
            policy = self._policy
            current = policy.certificates.get(principal.credential) if policy else None
            if current is None:
                raise Unauthenticated("the client certificate is no longer accepted")
        elif principal.kind == "token" and principal.credential:
            policy = self._policy
            current = policy.tokens.get(principal.credential) if policy else None
            if current is None:
                raise Unauthenticated("the token was revoked")
        elif principal.kind == "jwt":
            current = self._resolve_token(principal.credential)
        else:
            return principal
        if not current.rights.allows(action, channel):
            raise PermissionDenied(f"{current.name} may no longer {action} on channel {channel!r}")
        return current

    # -- authentication ----------------------------------------------------------------------
    def _resolve_token(self, token: str) -> Principal:
        """The principal of a bearer token (cached; expiry is checked by the caller)."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        policy = self._policy
        assert policy is not None
        principal = policy.tokens.get(token_sha256(token))
        if principal is None:
            if policy.jwt is None or token.count(".") != 2:
                raise Unauthenticated("unknown token")
            principal = _verify_jwt(policy.jwt, token, self._generation)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[token] = principal
        return principal

    def _certificate(self, context: Context) -> Principal | None:
        policy = self._policy
        if policy is None or not policy.certificates:
            return None
        auth = context.auth_context() or {}
        for key in ("x509_subject", "x509_common_name"):
            for value in auth.get(key, ()):
                subject = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                principal = policy.certificates.get(subject)
                if principal is not None:
                    return Principal(
                        principal.name,
                        principal.rights,
                        kind="certificate",
                        credential=subject,
                        generation=self._generation,
                    )
        return None

    def authenticate(self, context: Context) -> Principal:
        """Who is calling; UNAUTHENTICATED (logged, without the token) if nobody we know."""
        if self._policy is None:
            return ANONYMOUS
        token: str | None = None
        try:
            headers = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
            if len(headers) > 1:
                raise Unauthenticated("more than one 'authorization' header")
            if headers:
                value = headers[0]
                value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                scheme, _, token = value.strip().partition(" ")
                token = token.strip()
                if scheme.lower() != "bearer" or not token:
                    raise Unauthenticated("expected 'authorization: Bearer <token>' metadata")
            if token is None:
                principal = self._certificate(context)
                if principal is None:
                    raise Unauthenticated("no token: send 'authorization: Bearer <token>' metadata")
                return principal
            principal = self._resolve_token(token)
            if principal.expires is not None and time.time() >= principal.expires:
                self._cache.pop(token, None)
                raise _Named("the token expired: get a new one", principal.name)
            return principal
        except Unauthenticated as exc:
            self.failures += 1
            name = exc.name if isinstance(exc, _Named) and exc.name else ""
            self._fail(str(exc), name=name, context=context)
            raise Unauthenticated(str(exc)) from None

    # -- authorization -----------------------------------------------------------------------
    def check(
        self, principal: Principal, action: Action, channel: str = "", context: Context | None = None
    ) -> Principal:
        """PERMISSION_DENIED unless ``principal`` may ``action`` on ``channel``; UNAUTHENTICATED
        once its token expired (or a reload revoked it). Returns the principal as now in force."""
        if principal.kind == "anonymous":
            return principal
        if principal.expires is not None and time.time() >= principal.expires:
            self.failures += 1
            self._fail("the token expired", name=principal.name, channel=channel, context=context)
            raise Unauthenticated("the token expired: get a new one")
        if principal.generation != self._generation:  # the rules were reloaded since
            try:
                principal = self._recheck(principal, action, channel)
            except PushChannelError as exc:
                self.failures += 1
                code: Code = "UNAUTHENTICATED" if isinstance(exc, Unauthenticated) else "PERMISSION_DENIED"
                self._fail(str(exc), code=code, name=principal.name, channel=channel, context=context)
                raise
        if not principal.rights.allows(action, channel):
            self.failures += 1
            denied: Code = "PERMISSION_DENIED"
            if action == ADMIN:
                self._fail("not admin", code=denied, name=principal.name, context=context)
                raise PermissionDenied(f"{principal.name} may not use the admin calls")
            self._fail(
                f"no {action} right", code=denied, name=principal.name, channel=channel, context=context
            )
            raise PermissionDenied(f"{principal.name} may not {action} on channel {_shown(channel)}")
        return principal

    def authorize(self, context: Context, action: Action | None = None, channel: str = "") -> Principal:
        """Authenticate the call and (with ``action``) check one right: the servicers' one call."""
        if self._policy is None:
            return ANONYMOUS
        principal = self.authenticate(context)
        return principal if action is None else self.check(principal, action, channel, context)

    # -- long-lived streams ------------------------------------------------------------------
    def watch(
        self,
        principal: Principal,
        action: Action,
        channel: str,
        close: Callable[[PushChannelError], None],
    ) -> Watch:
        """Close a stream with UNAUTHENTICATED when its token expires, and re-check it on reload.
        ``cancel()`` the watch when the stream ends."""
        if principal.kind == "anonymous":
            return _NO_WATCH
        watch = Watch(principal, action, channel, close, self._watches)

        def expired() -> None:
            watch.timer = None
            watch.cancel()
            self._fail(
                f"the token expired: {action} stream closed",
                name=principal.name,
                channel=channel,
                context=watch.context,
            )
            close(Unauthenticated("the token expired: get a new one and reconnect"))

        if principal.expires is not None:
            delay = max(0.0, principal.expires - time.time())
            watch.timer = asyncio.get_running_loop().call_later(delay, expired)
        self._watches.add(watch)
        return watch

    def until_expiry(self, principal: Principal, requests: AsyncIterator[T]) -> AsyncIterator[T]:
        """The requests of a stream, until its token expires (then UNAUTHENTICATED). Without an
        expiry: ``requests`` themselves, with nothing in between."""
        if principal.expires is None:
            return requests
        return self._until(principal, principal.expires, requests)

    async def _until(
        self, principal: Principal, expires: float, requests: AsyncIterator[T]
    ) -> AsyncIterator[T]:
        iterator = aiter(requests)
        while True:
            remaining = expires - time.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    request = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self._fail("the token expired: stream closed", name=principal.name)
                raise Unauthenticated("the token expired: get a new one and reconnect") from None
            yield request


# -- who may listen where -------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(listen: str, *, auth: bool, mutual_tls: bool, insecure: bool) -> None:
    """Refuse to serve without authentication on an address others can reach, unless told
    to (``--insecure``). Mutual TLS counts as authentication: only certificate holders connect."""
    host = listen.rpartition(":")[0]
    if auth or mutual_tls or insecure or is_loopback(host):
        return
    raise InvalidArgument(
        f"refusing to listen on {listen} without authentication: anyone who can reach it could "
        "publish and subscribe. Give --auth FILE (tokens) or --tls-client-ca (mutual TLS), or "
        "--insecure if something else guards the port"
    )
