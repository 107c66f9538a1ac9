"""Configuration: the only reader of the process environment (and of `.env`)."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from typing import Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values

# The slow-consumer bound (docs/contract.md): a client more than MAX_BACKLOG messages or
# DROID_MAX_BACKLOG_BYTES behind is cut, on every transport; one that takes nothing for
# DRAIN_TIMEOUT_S while a replay or an SSE stream waits for it is cut too.
MAX_BACKLOG = 1000
MAX_BACKLOG_BYTES = 4 * 1024 * 1024
DRAIN_TIMEOUT_S = 30.0


# Standard Webhooks' schedule: the delay before each attempt (immediately, 5 s, 5 min, 30 min,
# 2 h, 5 h, 10 h, 10 h, 24 h: about 3 days in all).
WEBHOOK_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0, 86400.0)


class ConfigError(Exception):
    """A variable has a value Droid cannot run with; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 3000
    env: str = "development"
    mongodb_uri: str | None = None
    mongodb_db: str = "droid"
    data_dir: str = "droid-data"
    jwt_secret: str = ""
    jwt_secret_generated: bool = False
    jwt_secret_kept: str | None = None  # the file a generated key is kept in (development)
    jwt_public_key: str | None = None
    jwt_expires_in: int = 3600
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    redis_url: str | None = None
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str | None = None
    metrics_token: str | None = None
    worker_concurrency: int = 4
    task_max_retries: int = 2
    task_timeout_s: float = 120.0
    log_level: str = "INFO"
    # Additions of this implementation (documented in the README).
    lease_s: float = 30.0
    retry_backoff_s: float = 1.0
    demo_delay_s: float = 1.5
    llm_timeout_s: float = 60.0
    ws_compression: bool = False
    shutdown_grace_s: float = 5.0
    presence_ttl_s: float = 15.0
    redis_tls_verify: bool = True
    event_retention_s: int = 48 * 3600
    # Limits against slow, large or repeated requests (README "Limits").
    trusted_proxies: tuple[str, ...] = ()  # whose X-Forwarded-For is used: addresses, or "*"
    max_backlog_bytes: int = MAX_BACKLOG_BYTES
    # Connections and Engine.IO sessions (README "Limits"): 0 = the descriptor limit less a reserve
    max_connections: int = 0
    anon_sessions_per_address: int = 100  # Engine.IO sessions not on /events, per address
    anon_sessions: int = 5000             # ... and in all
    connect_packet_timeout_s: float = 10.0  # a session's first Socket.IO CONNECT
    join_timeout_s: float = 45.0            # on /events (socket.io's connectTimeout)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    auth_attempts_per_address: int = 30  # a minute, login and registration together
    auth_failures_per_account: int = 10  # in 10 minutes, failed logins and registrations
    # Webhooks (issue 23; README "API keys and webhooks").
    webhook_retry_schedule: tuple[float, ...] = WEBHOOK_RETRY_SCHEDULE
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 15.0
    webhook_disable_after_s: float = 5 * 86400.0
    webhook_concurrency: int = 8
    # Issue 22: quotas per user (0: none), pages, argon2 work, LLM answers (README "Limits").
    quota_tasks_per_minute: int = 600
    quota_pending_tasks: int = 1000
    quota_stored_bytes: int = 1024 ** 3
    max_page_bytes: int = 1024 * 1024
    argon2_concurrency: int = 2
    argon2_queue: int = 16
    llm_max_answer_bytes: int = 1024 * 1024
    llm_max_tokens: int | None = None
    llm_retry_after_max_s: float = 600.0
    event_loop: str = "auto"  # DROID_EVENT_LOOP: auto (uvloop when installed), uvloop, asyncio
    instance_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(6))

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def sqlite_path(self) -> str:
        """The embedded database's file (used when MONGODB_URI is unset), or `:memory:`."""
        if self.data_dir == ":memory:":
            return ":memory:"
        return os.path.join(self.data_dir, "droid.sqlite3")

    @property
    def cors_any(self) -> bool:
        return "*" in self.cors_origins


def _int(env: Mapping[str, str], name: str, default: int, lo: int | None = None,
         hi: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= lo or value != value or value == float("inf"):
        raise ConfigError(f"{name} must be a number >= {lo}, got {raw!r}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _opt(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    return raw or None


def _check_url(name: str, value: str | None, schemes: tuple[str, ...]) -> None:
    if value is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(f"{name} must start with {' or '.join(s + '://' for s in schemes)}")


def _proxies(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("DROID_TRUSTED_PROXIES", "").strip()
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if "*" in items:
        if len(items) > 1:
            raise ConfigError("DROID_TRUSTED_PROXIES is either * or a list of addresses")
        return items
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"DROID_TRUSTED_PROXIES: {item!r} is not an IP address or "
                              f"network") from None
    return items


def _schedule(env: Mapping[str, str]) -> tuple[float, ...]:
    raw = env.get("DROID_WEBHOOK_RETRY_SCHEDULE", "").strip()
    if raw == "":
        return WEBHOOK_RETRY_SCHEDULE
    out = []
    for item in raw.split(","):
        try:
            value = float(item.strip())
        except ValueError:
            value = -1.0
        if not 0 <= value <= 7 * 86400:  # also NaN and inf
            raise ConfigError("DROID_WEBHOOK_RETRY_SCHEDULE must be comma-separated seconds "
                              f"(each 0 to 604800), got {raw!r}")
        out.append(value)
    if not 1 <= len(out) <= 20:
        raise ConfigError("DROID_WEBHOOK_RETRY_SCHEDULE must list 1 to 20 delays")
    return tuple(out)


def _db_from_uri(uri: str | None) -> str | None:
    if not uri:
        return None
    path = urlsplit(uri).path.lstrip("/")
    return path.split("?")[0] or None


def load_config(environ: Mapping[str, str] | None = None, dotenv_path: str | None = ".env") -> Config:
    """Build the configuration from `.env` (if present) overlaid by the environment.

    Raises ConfigError with one line that names the offending variable.
    """
    env: dict[str, str] = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    env.update(os.environ if environ is None else environ)

    droid_env = (env.get("DROID_ENV", "").strip() or "development").lower()
    if droid_env not in ("development", "production", "test"):
        raise ConfigError(f"DROID_ENV must be development, production or test, got {droid_env!r}")

    mongodb_uri = _opt(env, "MONGODB_URI")
    _check_url("MONGODB_URI", mongodb_uri, ("mongodb", "mongodb+srv"))
    redis_url = _opt(env, "REDIS_URL")
    _check_url("REDIS_URL", redis_url, ("redis", "rediss", "unix"))
    llm_base_url = _opt(env, "LLM_BASE_URL")
    _check_url("LLM_BASE_URL", llm_base_url, ("http", "https"))
    # The default agent (every task without agentId) runs on LLM_MODEL: without it every such
    # task would fail, so the mistake is reported at start-up rather than once per task.
    if llm_base_url and not _opt(env, "LLM_MODEL"):
        raise ConfigError("LLM_BASE_URL is set but LLM_MODEL is not: set LLM_MODEL to the model "
                          "the default agent runs on")
    metrics_token = _opt(env, "METRICS_TOKEN")
    if metrics_token is not None and len(metrics_token.encode()) < 16:
        raise ConfigError("METRICS_TOKEN must be at least 16 bytes")

    jwt_secret = _opt(env, "JWT_SECRET")
    jwt_public_key = _opt(env, "JWT_PUBLIC_KEY")
    if jwt_public_key and "\\n" in jwt_public_key and "\n" not in jwt_public_key:
        jwt_public_key = jwt_public_key.replace("\\n", "\n")  # one-line config vars (Heroku)
    if jwt_public_key and "BEGIN" not in jwt_public_key:
        raise ConfigError("JWT_PUBLIC_KEY must be a PEM public key (-----BEGIN PUBLIC KEY-----)")
    if jwt_secret is not None and len(jwt_secret.encode()) < 32:
        raise ConfigError("JWT_SECRET must be at least 32 bytes (RFC 7518 section 3.2)")

    if droid_env == "production":
        missing = [n for n, v in (("MONGODB_URI", mongodb_uri),) if not v]
        if not (jwt_secret or jwt_public_key):
            missing.append("JWT_SECRET")
        if missing:
            raise ConfigError(f"DROID_ENV=production requires {' and '.join(missing)}")

    cors = _origins(env.get("CORS_ORIGIN", "*"))
    log_level = (env.get("LOG_LEVEL", "").strip() or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")

    return Config(
        host=env.get("HOST", "").strip() or "0.0.0.0",
        port=_int(env, "PORT", 3000, 0, 65535),
        env=droid_env,
        mongodb_uri=mongodb_uri,
        mongodb_db=_opt(env, "MONGODB_DB") or _db_from_uri(mongodb_uri) or "droid",
        data_dir=_opt(env, "DROID_DATA_DIR") or "droid-data",
        jwt_secret=jwt_secret or secrets.token_urlsafe(48),
        jwt_secret_generated=jwt_secret is None,
        jwt_public_key=jwt_public_key,
        jwt_expires_in=_int(env, "JWT_EXPIRES_IN", 3600, 1, 10 * 365 * 86400),
        jwt_issuer=_opt(env, "JWT_ISSUER"),
        jwt_audience=_opt(env, "JWT_AUDIENCE"),
        cors_origins=cors or ("*",),
        redis_url=redis_url,
        llm_base_url=llm_base_url.rstrip("/") if llm_base_url else None,
        llm_api_key=_opt(env, "LLM_API_KEY"),
        llm_model=_opt(env, "LLM_MODEL"),
        metrics_token=metrics_token,
        worker_concurrency=_int(env, "WORKER_CONCURRENCY", 4, 0, 1000),
        task_max_retries=_int(env, "TASK_MAX_RETRIES", 2, 0, 100),
        task_timeout_s=_float(env, "TASK_TIMEOUT_S", 120.0, 0.001),
        log_level=log_level,
        lease_s=_float(env, "DROID_LEASE_S", 30.0, 0.05),
        retry_backoff_s=_float(env, "DROID_RETRY_BACKOFF_S", 1.0),
        demo_delay_s=_float(env, "DROID_DEMO_DELAY_S", 1.5),
        llm_timeout_s=_float(env, "LLM_TIMEOUT_S", 60.0, 0.001),
        ws_compression=_bool(env, "DROID_WS_COMPRESSION", False),
        shutdown_grace_s=_float(env, "DROID_SHUTDOWN_GRACE_S", 5.0),
        presence_ttl_s=_float(env, "DROID_PRESENCE_TTL_S", 15.0, 0.5),
        redis_tls_verify=_bool(env, "REDIS_TLS_VERIFY", True),
        event_retention_s=_int(env, "DROID_EVENT_RETENTION_S", 48 * 3600, 86400),
        trusted_proxies=_proxies(env),
        max_backlog_bytes=_int(env, "DROID_MAX_BACKLOG_BYTES", MAX_BACKLOG_BYTES, 64 * 1024),
        max_connections=_int(env, "DROID_MAX_CONNECTIONS", 0, 1, 10**7),
        anon_sessions_per_address=_int(env, "DROID_ANON_SESSIONS_PER_ADDRESS", 100, 1, 10**7),
        anon_sessions=_int(env, "DROID_ANON_SESSIONS", 5000, 1, 10**7),
        connect_packet_timeout_s=_float(env, "DROID_CONNECT_PACKET_TIMEOUT_S", 10.0, 0.1),
        join_timeout_s=_float(env, "DROID_JOIN_TIMEOUT_S", 45.0, 0.1),
        header_timeout_s=_float(env, "DROID_HEADER_TIMEOUT_S", 10.0, 0.1),
        body_timeout_s=_float(env, "DROID_BODY_TIMEOUT_S", 60.0, 0.1),
        auth_attempts_per_address=_int(env, "DROID_AUTH_ATTEMPTS_PER_ADDRESS", 30, 1),
        auth_failures_per_account=_int(env, "DROID_AUTH_FAILURES_PER_ACCOUNT", 10, 1),
        webhook_retry_schedule=_schedule(env),
        webhook_allow_private=_bool(env, "DROID_WEBHOOK_ALLOW_PRIVATE", False),
        webhook_timeout_s=_float(env, "DROID_WEBHOOK_TIMEOUT_S", 15.0, 0.1),
        webhook_disable_after_s=_float(env, "DROID_WEBHOOK_DISABLE_AFTER_S", 5 * 86400.0, 1.0),
        webhook_concurrency=_int(env, "DROID_WEBHOOK_CONCURRENCY", 8, 0, 256),
        quota_tasks_per_minute=_int(env, "DROID_QUOTA_TASKS_PER_MINUTE", 600, 0),
        quota_pending_tasks=_int(env, "DROID_QUOTA_PENDING_TASKS", 1000, 0),
        quota_stored_bytes=_int(env, "DROID_QUOTA_STORED_BYTES", 1024 ** 3, 0),
        max_page_bytes=_int(env, "DROID_MAX_PAGE_BYTES", 1024 * 1024, 64 * 1024),
        argon2_concurrency=_int(env, "DROID_ARGON2_CONCURRENCY", 2, 1, 64),
        argon2_queue=_int(env, "DROID_ARGON2_QUEUE", 16, 0, 10000),
        llm_max_answer_bytes=_int(env, "LLM_MAX_ANSWER_BYTES", 1024 * 1024, 1024),
        llm_max_tokens=_int(env, "LLM_MAX_TOKENS", 0, 1) if _opt(env, "LLM_MAX_TOKENS") else None,
        llm_retry_after_max_s=_float(env, "LLM_RETRY_AFTER_MAX_S", 600.0),
        event_loop=_choice(env, "DROID_EVENT_LOOP", ("auto", "uvloop", "asyncio")),
    )


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (case-insensitive), the first when unset."""
    value = (env.get(name, "").strip() or choices[0]).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                          f"got {value!r}")
    return value


def _origins(raw: str) -> tuple[str, ...]:
    """CORS_ORIGIN's origins as browsers send them (scheme://host[:port], lower case), or `*`.
    Anything else could never match a browser's Origin header: refused at start-up."""
    origins = []
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*":
            origins.append(origin)
            continue
        try:
            parts = urlsplit(origin)
            ok = (parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
                  and not (parts.path or parts.query or parts.fragment or parts.username)
                  and (parts.port or 0) >= 0)
        except ValueError:  # a port that is not a number or out of range
            ok = False
        if not ok:
            raise ConfigError("CORS_ORIGIN must be * or comma-separated origins such as "
                              f"https://app.example.com (scheme://host[:port]), got {origin!r}")
        origins.append(origin.lower())
    return tuple(origins)


def keep_generated_secret(config: Config) -> Config:
    """In development without JWT_SECRET, keep the random key in the data folder, so that a
    restart does not sign everyone out. Unchanged when a key is configured or nothing persists
    (MONGODB_URI set, or DROID_DATA_DIR=:memory:)."""
    if (not config.jwt_secret_generated or config.jwt_public_key or config.mongodb_uri
            or config.data_dir == ":memory:"):
        return config
    path = os.path.join(config.data_dir, "jwt-secret")
    try:
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
            if len(secret.encode()) < 32:
                raise ConfigError(f"{path} holds no usable key: delete it or set JWT_SECRET") \
                    from None
        else:
            secret = config.jwt_secret
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secret + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        where = getattr(exc, "filename", None) or path
        raise ConfigError(f"DROID_DATA_DIR {config.data_dir!r} is not a folder Droid can use "
                          f"({where}: {reason})") from None
    return dataclasses.replace(config, jwt_secret=secret, jwt_secret_kept=path)
