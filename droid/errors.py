"""Domain errors; the HTTP layer renders each as {"statusCode", "error", "message"}."""
from __future__ import annotations

from http import HTTPStatus


def error_body(status: int, message: str | list[str], error: str | None = None) -> dict:
    """The contract's error shape: {"statusCode", "error", "message"}."""
    return {"statusCode": status, "error": error or HTTPStatus(status).phrase, "message": message}


class ApiError(Exception):
    status = 500

    def __init__(self, message: str | list[str], status: int | None = None) -> None:
        super().__init__(message if isinstance(message, str) else "; ".join(message))
        self.message = message
        if status is not None:
            self.status = status

    @property
    def reason(self) -> str:
        return HTTPStatus(self.status).phrase

    def body(self) -> dict:
        return error_body(self.status, self.message, self.reason)


class Invalid(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413
    reason = "Payload Too Large"  # NestJS's text; Python's phrase differs between versions


class Unavailable(ApiError):
    status = 503


class Busy(Unavailable):
    """503 with the seconds after which to try again (`Retry-After`): a bounded resource, such
    as the argon2 work of logins, is taken."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
