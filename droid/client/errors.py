"""The exceptions of the Droid client: one per kind of answer a caller may act on.

Every refusal by the server is an `ApiError` subclass carrying the contract's error shape
(`status_code`, `error`, `message`, and the whole `body`); failures to get an answer at all are
`ConnectionFailed` and `Timeout`. All of them derive from `DroidError`.
"""
from __future__ import annotations

import datetime as dt
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any


class DroidError(Exception):
    """Base of every error the client raises."""


class ConnectionFailed(DroidError):
    """The server could not be reached (refused, reset, unknown host, TLS failure)."""


class Timeout(DroidError, TimeoutError):
    """A call took longer than its timeout."""


class WaitTimeout(Timeout):
    """`tasks.wait` / `tasks.stream` reached their `timeout` before the task finished."""

    def __init__(self, message: str, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class WebhookVerificationError(DroidError):
    """A webhook request whose signature, headers or timestamp do not check out."""


class ApiError(DroidError):
    """The server answered with an error, in the shape `{"statusCode", "error", "message"}`.

    `message` is a string, or a list of strings when there were several validation errors;
    `str(exc)` joins them. `headers` are the answer's headers.
    """

    status_code: int = 0

    def __init__(self, status_code: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.error: str = str(body.get("error") or "")
        self.message: str | list[str] = body.get("message") or self.error or str(status_code)
        self.headers = headers or {}
        text = "; ".join(self.message) if isinstance(self.message, list) else self.message
        super().__init__(f"{status_code} {self.error}: {text}" if self.error else text)

    @property
    def text(self) -> str:
        """The message as one line (a list of messages joined with "; ")."""
        msg = self.message
        return "; ".join(str(m) for m in msg) if isinstance(msg, list) else str(msg)


class BadRequest(ApiError):
    """400: the request is invalid (the message names the rule)."""


class Unauthorized(ApiError):
    """401: no credential, an expired or invalid token, a revoked or unknown API key."""


class Forbidden(ApiError):
    """403: the credential does not allow this (a `read` API key on a write, for instance)."""


class NotFound(ApiError):
    """404: it does not exist, or is not the caller's."""


class Conflict(ApiError):
    """409: the state does not allow it (cancelling a finished task, a taken e-mail, a limit)."""


class PayloadTooLarge(ApiError):
    """413: the request body is over the server's limit (1 MiB), or a task would pass its user's
    stored-bytes quota (DROID_QUOTA_STORED_BYTES)."""


class RateLimited(ApiError):
    """429: too many requests; `retry_after` is the seconds the server asked to wait (or None)."""

    def __init__(self, status_code: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, body, headers)
        self.retry_after: float | None = parse_retry_after(self.headers.get("retry-after"))


class ServerError(ApiError):
    """5xx: the server failed."""


class ServiceUnavailable(ServerError):
    """503: the server cannot serve now (its database is down, or it is starting or stopping)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 429: RateLimited, 503: ServiceUnavailable,
}


def error_for(status_code: int, body: Any, headers: dict[str, str] | None = None) -> ApiError:
    """The typed exception of an error answer. A body that is not the error shape (a proxy's
    HTML page, say) is described by the status's reason instead."""
    if not isinstance(body, dict) or "statusCode" not in body:
        try:
            reason = HTTPStatus(status_code).phrase
        except ValueError:
            reason = "Error"
        text = body.strip()[:200] if isinstance(body, str) and body.strip() else reason
        body = {"statusCode": status_code, "error": reason, "message": text}
    cls = _BY_STATUS.get(status_code)
    if cls is None:
        cls = ServerError if status_code >= 500 else ApiError
    return cls(status_code, body, {k.lower(): v for k, v in (headers or {}).items()})


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())
