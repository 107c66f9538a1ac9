"""The OpenAPI 3.1 document, generated from the pydantic models that validate requests."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas as s

_MODELS: list[type[BaseModel]] = [s.RegisterBody, s.LoginBody, s.AgentBody, s.TaskBody, s.User,
                                  s.AuthReply, s.Agent, s.Task, s.TaskPage, s.Envelope,
                                  s.EventPage, s.Health, s.ErrorReply, s.ApiKeyBody, s.ApiKey,
                                  s.ApiKeyCreated, s.WebhookBody, s.WebhookPatch,
                                  s.WebhookEndpoint, s.WebhookEndpointSecret, s.DeliveryAttempt,
                                  s.Delivery, s.DeliveryPage, s.WebhookPayload]
_ERR = {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorReply"}}}}
# Every route that reads or writes the database: nothing of the request is stored.
_UNAVAILABLE = {**_ERR, "description": "The database cannot serve this now (a full disk, a "
                                       "read-only or locked database, a database gone); nothing "
                                       "was stored. Retry after `Retry-After` seconds",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}}}


def _ref(model: type[BaseModel] | None, array: bool = False) -> dict:
    if model is None:
        return {}
    schema: dict = {"$ref": f"#/components/schemas/{model.__name__}"}
    if array:
        schema = {"type": "array", "items": schema}
    return {"content": {"application/json": {"schema": schema}}}


def _query(model: type[BaseModel]) -> list[dict]:
    schema = model.model_json_schema()
    return [{"name": name, "in": "query", "required": False, "schema": prop}
            for name, prop in schema["properties"].items()]


def _op(summary: str, ok: int, reply: type[BaseModel] | None, *, body: type[BaseModel] | None = None,
        auth: bool = True, errors: tuple[int, ...] = (), array: bool = False,
        params: list[dict] | None = None, headers: list[dict] | None = None,
        extra: dict | None = None) -> dict:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {str(ok): {"description": "OK", **_ref(reply, array)}}}
    if extra:
        op["responses"].update(extra)
    codes = set(errors) | ({401} if auth else set()) | ({400, 413} if body else set())
    for code in sorted(codes):
        op["responses"][str(code)] = _ERR
    op["responses"].setdefault("503", _UNAVAILABLE)
    if body is not None:
        op["requestBody"] = {"required": True, **_ref(body)}
    if auth:
        op["security"] = [{"bearer": []}]
    parameters = (params or []) + (headers or [])
    if parameters:
        op["parameters"] = parameters
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_DELIVERY_ID = _ID + [{"name": "deliveryId", "in": "path", "required": True,
                       "schema": {"type": "string"}}]
_NO_CONTENT = {"204": {"description": "Done (no body)"}}


def _keys_and_webhooks() -> dict:
    """Routes of API keys and webhook endpoints (issue 23). A `read` API key gets 403 on each
    route that changes something."""
    def write(summary: str, ok: int, reply: Any, **kw: Any) -> dict:
        kw["errors"] = tuple(kw.get("errors", ())) + (403,)
        return _op(summary, ok, reply, **kw)

    def empty(summary: str, **kw: Any) -> dict:
        op = write(summary, 204, None, **kw)
        op["responses"] = {**_NO_CONTENT, **{k: v for k, v in op["responses"].items()
                                             if k != "204"}}
        return op

    return {
        "/api-keys": {
            "get": _op("The caller's API keys, oldest first (never the keys themselves)", 200,
                       s.ApiKey, array=True),
            "post": write("Create an API key: the key is in this answer only", 201,
                          s.ApiKeyCreated, body=s.ApiKeyBody, errors=(409,))},
        "/api-keys/{id}": {"delete": empty("Revoke an API key, on every process, and "
                                           "disconnect the sockets opened with it",
                                           errors=(404,), params=_ID)},
        "/webhooks": {
            "get": _op("The caller's webhook endpoints", 200, s.WebhookEndpoint, array=True),
            "post": write("Add a webhook endpoint: its signing secret is in this answer only",
                          201, s.WebhookEndpointSecret, body=s.WebhookBody, errors=(409,))},
        "/webhooks/{id}": {
            "get": _op("One webhook endpoint", 200, s.WebhookEndpoint, errors=(404,),
                       params=_ID),
            "patch": write("Change a webhook endpoint (enabled: true starts it again from the "
                           "present)", 200, s.WebhookEndpoint, body=s.WebhookPatch,
                           errors=(404,), params=_ID),
            "delete": empty("Delete a webhook endpoint and its delivery log", errors=(404,),
                            params=_ID)},
        "/webhooks/{id}/rotate-secret": {"post": write(
            "A new signing secret; the old one keeps signing beside it for 24 hours", 200,
            s.WebhookEndpointSecret, errors=(404,), params=_ID)},
        "/webhooks/{id}/test": {"post": write(
            "Send a webhook.test event (one attempt)", 202, s.Delivery, errors=(404, 409),
            params=_ID)},
        "/webhooks/{id}/deliveries": {"get": _op(
            "The endpoint's deliveries, newest first", 200, s.DeliveryPage, errors=(400, 404),
            params=_ID + _query(s.DeliveriesQuery))},
        "/webhooks/{id}/deliveries/{deliveryId}/retry": {"post": write(
            "One more attempt of a finished delivery, now", 202, s.Delivery,
            errors=(404, 409), params=_DELIVERY_ID)},
    }


def build_openapi(version: str) -> dict:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    paths = {
        "/auth/register": {"post": _op("Create an account", 201, s.AuthReply, body=s.RegisterBody,
                                       auth=False, errors=(409, 429, 503))},
        "/auth/login": {"post": _op("Sign in", 200, s.AuthReply, body=s.LoginBody, auth=False,
                                    errors=(401, 429, 503))},
        "/auth/me": {"get": _op("The caller", 200, s.User)},
        "/agents": {"get": _op("The default agent and the caller's", 200, s.Agent, array=True),
                    "post": _op("Create an agent", 201, s.Agent, body=s.AgentBody)},
        "/tasks": {
            "get": _op("The caller's tasks, newest first", 200, s.TaskPage, errors=(400,),
                       params=_query(s.TaskQuery)),
            "post": _op("Create a task", 201, s.Task, body=s.TaskBody, errors=(404, 429),
                        headers=[{"name": "Idempotency-Key", "in": "header", "required": False,
                                  "schema": {"type": "string", "minLength": 1,
                                             "maxLength": 255}}],
                        extra={"200": {"description": "The task first created with this "
                                                      "Idempotency-Key", **_ref(s.Task)}})},
        "/tasks/{id}": {"get": _op("One task", 200, s.Task, errors=(404,), params=_ID)},
        "/tasks/{id}/cancel": {"post": _op("Cancel a pending or processing task", 200, s.Task,
                                           errors=(404, 409), params=_ID)},
        **_keys_and_webhooks(),
        "/events": {"get": _op("Stored event envelopes after a seq", 200, s.EventPage,
                               errors=(400,), params=_query(s.EventsQuery))},
        "/events/stream": {"get": {
            "summary": "Live event envelopes as Server-Sent Events",
            "description": "Stored envelopes carry `id:` (their seq); live `task.progress` "
                           "ones come without. A resume point older than what is kept starts "
                           "with `event: resync` `{oldestSeq}`, then what is kept.",
            "security": [{"bearer": []}],
            "parameters": [{"name": "after", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0}},
                           {"name": "Last-Event-ID", "in": "header", "required": False,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "An event stream",
                                  "content": {"text/event-stream": {"schema": {
                                      "type": "object",
                                      "properties": {"id": {"type": "string"},
                                                     "event": {"type": "string"},
                                                     "data": {"type": "string"}}}}}},
                          "400": _ERR, "401": _ERR}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "description": "Needs `Authorization: Bearer <METRICS_TOKEN>` when "
                                            "METRICS_TOKEN is set (user tokens are not accepted); "
                                            "without it, open to loopback in development and "
                                            "test, refused (403) otherwise.",
                             "security": [{}, {"metricsToken": []}],
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {
                                                       "schema": {"type": "string"}}}},
                                           "401": _ERR, "403": _ERR}}},
        "/health": {"get": _op("Liveness and dependencies", 200, s.Health, auth=False,
                               extra={"503": {"description": "A dependency is down (`db`: "
                                                             "`down`, or `failing` while the "
                                                             "database refuses writes)",
                                              **_ref(s.Health)}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Droid", "version": version,
                 "description": "Tasks for AI agents, with live events on Socket.IO /events."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "webhooks": {"task event": {"post": {
            "summary": "A delivery to your endpoint (Standard Webhooks)",
            "description": "Headers webhook-id (the same on every retry of one event to one "
                           "endpoint), webhook-timestamp (seconds, this attempt's) and "
                           "webhook-signature (v1,<base64 HMAC-SHA256 of "
                           "`id.timestamp.body` with the base64-decoded secret after whsec_>; "
                           "two, space-separated, for 24 hours after a rotation). Answer 2xx "
                           "within 15 s; 410 disables the endpoint.",
            "requestBody": {"required": True, **_ref(s.WebhookPayload)},
            "responses": {"200": {"description": "Received"}}}}},
        "components": {"schemas": defs["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "bearerFormat": "JWT or droid_sk_ API key"},
                                           "metricsToken": {"type": "http", "scheme": "bearer"}}},
    }
