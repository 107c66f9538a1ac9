"""Passwords and tokens. No HTTP here: callers turn AuthError into their own answer."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import os
import threading
import time
from typing import Any, Callable, TypeVar

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import Config, ConfigError
from .errors import Busy

T = TypeVar("T")


class AuthError(Exception):
    """A token was refused. `message` is one of the contract's fixed texts."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


MISSING = "Authentication required"
EXPIRED = "Token expired"
INVALID = "Invalid token"


@dataclasses.dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: float
    claims: dict[str, Any]
    # Set for an API key (droid/apikeys.py): "read" or "write", and the key's id. A JWT may do
    # everything its user may.
    scope: str | None = None
    key_id: str | None = None


class Passwords:
    """argon2id hashing, off the event loop (it is deliberately slow), bounded overall.

    At most `concurrency` hashes or verifications run at once, in threads of their own (never
    the loop's default executor) at a lower priority than the loop's (ARGON2_NICE), and at most
    `queue` more wait for one; beyond that the call
    raises errors.Busy at once (a 503 with Retry-After), so that a flood of logins from many
    addresses costs at most `concurrency` cores and `concurrency` x `memory_kib` of memory
    (argon2-cffi's memory_cost per hash: 64 MiB by default), and a real user waits at most a
    queue's worth of hashes or gets a fast answer.
    """

    def __init__(self, concurrency: int = 2, queue: int = 16) -> None:
        self._hasher = PasswordHasher()
        self.concurrency = concurrency
        self.queue = queue
        self.memory_kib = self._hasher.memory_cost
        self._pool = concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix="droid-argon2", initializer=_lower_priority)
        self.running = 0  # calls running or waiting for a thread
        self.refused = 0
        # A fixed hash to verify against when the e-mail is unknown, so that timing does not
        # tell which e-mails are registered.
        self._dummy = self._hasher.hash("droid-dummy-password")

    def describe(self) -> str:
        mib = self.memory_kib / 1024
        return (f"argon2: {self.concurrency} at once ({mib:g} MiB each, up to "
                f"{mib * self.concurrency:g} MiB), {self.queue} more may wait")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.running >= self.concurrency + self.queue:
            self.refused += 1
            raise Busy("Too many logins and registrations at once; retry in a second", 1)
        self.running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.running -= 1

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, hashed: str | None, password: str) -> bool:
        def check() -> bool:
            try:
                return self._hasher.verify(hashed or self._dummy, password) and hashed is not None
            except (VerificationError, InvalidHashError):
                return False
        return await self._run(check)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


ARGON2_NICE = 10


def _lower_priority() -> None:
    """An argon2 thread yields the CPU to the event loop's: under a flood of logins the loop
    still answers everything else (Linux sets a nice value per thread; elsewhere nothing)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + ARGON2_NICE)
    except (AttributeError, OSError):
        pass


class Tokens:
    """Issues HS256 tokens and verifies them, plus RS256/ES256 ones from an external issuer."""

    LEEWAY_S = 5
    # Verified tokens are remembered (bounded) because a client sends the same one on every
    # request: checking its signature and claims again cost ~8% of the server's CPU per task.
    # Tokens are stateless here (there is no revocation to honour), and `exp` is still checked
    # on every use. Only tokens that passed every check are kept, by their exact text.
    VERIFIED_MAX = 1024
    VERIFIED_TOKEN_MAX_LEN = 2048

    def __init__(self, config: Config) -> None:
        self.secret = config.jwt_secret
        self.expires_in = config.jwt_expires_in
        self.issuer = config.jwt_issuer
        self.audience = config.jwt_audience
        self.public_key: Any = None
        self.public_alg: str | None = None
        if config.jwt_public_key:
            try:
                self.public_key = load_pem_public_key(config.jwt_public_key.encode())
            except ValueError:
                raise ConfigError("JWT_PUBLIC_KEY is not a valid PEM public key") from None
            if isinstance(self.public_key, rsa.RSAPublicKey):
                self.public_alg = "RS256"
            elif isinstance(self.public_key, ec.EllipticCurvePublicKey):
                self.public_alg = "ES256"
            else:
                raise ConfigError("JWT_PUBLIC_KEY must be an RSA or EC (P-256) public key")
        self._verified: dict[str, Identity] = {}

    def issue(self, user_id: str, **extra: Any) -> tuple[str, int]:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + self.expires_in, **extra}
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        return jwt.encode(claims, self.secret, algorithm="HS256"), self.expires_in

    def verify(self, token: str | None) -> Identity:
        """The identity a token proves; raises AuthError with the contract's message."""
        if not token or not isinstance(token, str):
            raise AuthError(MISSING)
        if len(token) > 8192:
            raise AuthError(INVALID)
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at <= time.time() - self.LEEWAY_S:
                self._verified.pop(token, None)
                raise AuthError(EXPIRED)
            return known
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise AuthError(INVALID) from None
        # Each key is used with exactly one algorithm, chosen by us (RFC 8725 section 3.1): the
        # header only selects between our two keys, never the algorithm a key is used with.
        if alg == "HS256":
            key, algorithms = self.secret, ["HS256"]
        elif self.public_alg is not None and alg == self.public_alg:
            key, algorithms = self.public_key, [self.public_alg]
        else:
            raise AuthError(INVALID)
        require = ["exp", "sub"]
        if self.issuer:
            require.append("iss")
        if self.audience:
            require.append("aud")
        # `exp` is checked here, after the signature: PyJWT reads `exp: true` as 1 (long past)
        # and would call a malformed token expired.
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, issuer=self.issuer,
                                audience=self.audience, leeway=self.LEEWAY_S,
                                options={"require": require, "verify_aud": bool(self.audience),
                                         "verify_exp": False})
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            raise AuthError(INVALID) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise AuthError(INVALID)
        if any(not _is_time(claims[name]) for name in ("exp", "iat", "nbf") if name in claims):
            raise AuthError(INVALID)
        exp = float(claims["exp"])
        if exp <= time.time() - self.LEEWAY_S:
            raise AuthError(EXPIRED)
        identity = Identity(user_id=sub, expires_at=exp, claims=claims)
        if len(token) <= self.VERIFIED_TOKEN_MAX_LEN:
            if len(self._verified) >= self.VERIFIED_MAX:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[token] = identity
        return identity


def _is_time(value: Any) -> bool:
    """A NumericDate (RFC 7519 section 2): a finite number, and not a boolean."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` value (a bare token is tolerated)."""
    if not value or not isinstance(value, str):
        return None
    value = value.strip()
    if value.lower() == "bearer":
        return None
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value or None
