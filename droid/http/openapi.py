"""The OpenAPI 3.1 document, generated from the pydantic models that validate requests."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas as s

_MODELS: list[type[BaseModel]] = [s.RegisterBody, s.LoginBody, s.AgentBody, s.TaskBody, s.User,
                                  s.AuthReply, s.Agent, s.Task, s.TaskPage, s.Envelope,
                                  s.EventPage, s.Health, s.ErrorReply]
_ERR = {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorReply"}}}}


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
    if body is not None:
        op["requestBody"] = {"required": True, **_ref(body)}
    if auth:
        op["security"] = [{"bearer": []}]
    parameters = (params or []) + (headers or [])
    if parameters:
        op["parameters"] = parameters
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]


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
        "/events": {"get": _op("Stored event envelopes after a seq", 200, s.EventPage,
                               errors=(400,), params=_query(s.EventsQuery))},
        "/events/stream": {"get": {
            "summary": "Live event envelopes as Server-Sent Events",
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
                               extra={"503": {"description": "A dependency is down",
                                              **_ref(s.Health)}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Droid", "version": version,
                 "description": "Tasks for AI agents, with live events on Socket.IO /events."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": defs["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "bearerFormat": "JWT"},
                                           "metricsToken": {"type": "http", "scheme": "bearer"}}},
    }
