"""The base handler: JSON in and out, bounded bodies, one error shape, bearer authentication."""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, TypeVar

import orjson
import pydantic
import tornado.web

from ..apikeys import INVALID_KEY, SCOPE_DENIED, is_api_key
from ..auth import AuthError, Identity, bearer
from ..errors import ApiError, Forbidden, Invalid, Unauthorized
from ..util import dumps
from ..web import BoundedBody, write_api_error, write_error

log = logging.getLogger(__name__)
M = TypeVar("M", bound=pydantic.BaseModel)


_MESSAGES = {
    "missing": "{field} is required",
    "string_type": "{field} must be a string",
    "string_too_long": "{field} must be at most {max_length} characters",
    "dict_type": "{field} must be an object",
    "int_type": "{field} must be a whole number",
    "int_parsing": "{field} must be a whole number",
    "int_from_float": "{field} must be a whole number",
    "greater_than_equal": "{field} must be at least {ge}",
    "less_than_equal": "{field} must be at most {le}",
    "literal_error": "{field} must be one of {expected}",
}


def error_messages(exc: pydantic.ValidationError) -> list[str]:
    """pydantic's errors as short sentences that name the field ("prompt must be a string")."""
    out = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        ctx = err.get("ctx") or {}
        kind = err["type"]
        if kind == "value_error":
            message = str(ctx.get("error") or err["msg"]).removeprefix("Value error, ")
            out.append(f"{field} must be a valid email address" if field == "email" else message)
        elif kind == "string_too_short":
            out.append(f"{field} must be a non-empty string" if ctx.get("min_length") == 1
                       else f"{field} must be at least {ctx.get('min_length')} characters")
        elif kind in _MESSAGES:
            expected = str(ctx.get("expected", "")).replace("'", "")
            out.append(_MESSAGES[kind].format(field=field, expected=expected, **{
                k: v for k, v in ctx.items() if k != "expected"}))
        else:
            out.append(f"{field}: {err['msg'][0].lower()}{err['msg'][1:]}")
    return out


def invalid(exc: pydantic.ValidationError) -> Invalid:
    """One message as a string, several as a list (the NestJS shape)."""
    messages = error_messages(exc)
    return Invalid(messages[0] if len(messages) == 1 else messages)


@tornado.web.stream_request_body
class ApiHandler(BoundedBody, tornado.web.RequestHandler):
    """JSON API base. The body is streamed so that an oversized one is refused unread."""

    store = property(lambda self: self.settings["store"])
    task_service = property(lambda self: self.settings["task_service"])
    agent_service = property(lambda self: self.settings["agent_service"])
    tokens = property(lambda self: self.settings["tokens"])
    config = property(lambda self: self.settings["config"])
    metrics = property(lambda self: self.settings["metrics"])

    def initialize(self) -> None:
        self.identity: Identity | None = None
        self._key: Identity | AuthError | None = None  # an API key's lookup (prepare)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        origins = self.settings["origins"]
        if not origins.any:
            self.set_header("Vary", "Origin")
        allow = origins.allow_header(self.request.headers.get("Origin"),
                                     self.request.headers.get("Host"))
        if allow is not None:
            self.set_header("Access-Control-Allow-Origin", allow)
            self.set_header("Access-Control-Expose-Headers", "Retry-After")  # on 429s and 503s

    async def prepare(self) -> None:
        self.start_body()
        await self.look_up_key()

    async def look_up_key(self) -> None:
        """An API key needs a store read (a JWT does not): done here, where the handler may
        wait, so that authenticate() stays synchronous. A key that fails is refused only if
        the route asks who the caller is."""
        token = self.bearer_token()
        if not is_api_key(token) or self.answered:
            return
        try:
            self._key = await self.settings["api_keys"].verify(token)
        except AuthError as exc:
            self._key = exc

    def options(self, *args: Any) -> None:
        self.set_header("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS")
        self.set_header("Access-Control-Allow-Headers",
                        "Authorization, Content-Type, Idempotency-Key, Last-Event-ID")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)

    # input -----------------------------------------------------------------------------------

    def body(self, model: type[M]) -> M:
        raw = self.take_body()
        if not raw.strip():
            raise Invalid("Request body must be a JSON object")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Invalid("Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise Invalid("Request body must be a JSON object")
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise invalid(exc) from None

    def query(self, model: type[M]) -> M:
        args = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        try:
            return model.model_validate(args)
        except pydantic.ValidationError as exc:
            raise invalid(exc) from None

    def bearer_token(self) -> str | None:
        return bearer(self.request.headers.get("Authorization"))

    def authenticate(self) -> Identity:
        token = self.bearer_token()
        if is_api_key(token):
            key = self._key
            if not isinstance(key, Identity):
                raise Unauthorized(key.message if isinstance(key, AuthError) else INVALID_KEY)
            if key.scope != "write" and self.request.method not in ("GET", "HEAD"):
                raise Forbidden(SCOPE_DENIED)
            self.identity = key
            return key
        try:
            self.identity = self.tokens.verify(token)
        except AuthError as exc:
            raise Unauthorized(exc.message) from None
        return self.identity

    @property
    def user_id(self) -> str:
        return (self.identity or self.authenticate()).user_id

    # output ----------------------------------------------------------------------------------

    def reply(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(dumps(value))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            write_api_error(self, exc)
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            if status_code == 405:
                self.set_header("Allow", ", ".join(self.allowed_methods()))
            write_error(self, status_code, _http_error_message(exc))
        else:
            write_error(self, 500 if status_code < 500 else status_code, "Internal server error")

    def allowed_methods(self) -> list[str]:
        base = tornado.web.RequestHandler
        return [m for m in ("GET", "POST", "PATCH", "DELETE")
                if getattr(type(self), m.lower()) is not getattr(base, m.lower())] + ["OPTIONS"]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            return
        if isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            return
        log.error("unexpected error on %s %s", self.request.method, self.request.path,
                  exc_info=(typ, value, tb))

    def on_finish(self) -> None:
        metrics = self.settings.get("metrics")
        if metrics is not None:
            metrics.http_requests.labels(code=f"{self.get_status() // 100}xx").inc()


def _http_error_message(exc: tornado.web.HTTPError) -> str:
    """The message of an error Tornado raised, in the client's terms (no Python reprs)."""
    message = exc.log_message or HTTPStatus(exc.status_code).phrase
    if exc.args:
        try:
            message = message % exc.args
        except (TypeError, ValueError):
            pass
    if message.startswith("Invalid unicode in "):  # "Invalid unicode in cursor: b'\\xff'"
        return f"{message[len('Invalid unicode in '):].split(':', 1)[0]} is not valid UTF-8"
    return message


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:  # type: ignore[override]
        raise ApiError("Cannot %s %s" % (self.request.method, self.request.path), 404)
