"""HTTP edges: body limits, unknown routes and methods, health, OpenAPI, the page."""
import asyncio

import pytest
from tornado.httpclient import AsyncHTTPClient

from conftest import Api

pytestmark = pytest.mark.asyncio


async def test_oversized_body_is_413_without_being_read(droid, api):
    user = await api.register()
    big = b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    reply = await api.post("/tasks", raw=big, token=user["token"])
    assert reply.status == 413
    assert reply.body == {"statusCode": 413, "error": "Content Too Large",
                          "message": "Request body is larger than 1048576 bytes"} or \
        reply.body["statusCode"] == 413


async def test_a_huge_declared_length_is_refused_before_the_body_arrives(droid):
    reader, writer = await asyncio.open_connection("127.0.0.1", droid.port)
    writer.write(b"POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 5000000000\r\n\r\n{")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head


async def test_unknown_route_and_method_use_the_error_shape(api):
    missing = await api.get("/nope")
    assert missing.status == 404 and missing.body["statusCode"] == 404
    assert "Cannot GET /nope" == missing.body["message"]
    wrong = await api.request("DELETE", "/tasks")
    assert wrong.status == 405 and wrong.body["statusCode"] == 405
    assert "GET" in wrong.headers["Allow"]


async def test_health_reports_the_database(api):
    reply = await api.get("/health")
    assert reply.status == 200 and reply.body["status"] == "ok" and reply.body["db"] == "ok"


async def test_health_is_503_when_the_database_is_down(droid, api):
    async def down():
        return False
    droid.store.ping = down
    reply = await api.get("/health")
    assert reply.status == 503 and reply.body["db"] == "down"


async def test_openapi_describes_every_route(api):
    reply = await api.get("/openapi.json")
    assert reply.status == 200 and reply.body["openapi"].startswith("3.1")
    paths = reply.body["paths"]
    for path in ("/auth/register", "/auth/login", "/auth/me", "/agents", "/tasks", "/tasks/{id}",
                 "/tasks/{id}/cancel", "/events", "/events/stream", "/metrics", "/health"):
        assert path in paths, path
    task_body = reply.body["components"]["schemas"]["TaskBody"]
    assert task_body["properties"]["prompt"]["maxLength"] == 32000


async def test_the_page_and_its_assets_are_served(droid):
    http = AsyncHTTPClient()
    page = await http.fetch(droid.url + "/")
    assert page.code == 200 and b"<html" in page.body.lower()
    assert page.headers["Content-Type"].startswith("text/html")


async def test_protected_routes_need_a_token(api):
    for method, path in (("GET", "/auth/me"), ("GET", "/agents"), ("POST", "/agents"),
                         ("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/tasks/x"),
                         ("POST", "/tasks/x/cancel"), ("GET", "/events"), ("GET", "/metrics")):
        reply = await api.request(method, path, {} if method == "POST" else None)
        assert reply.status == 401, (method, path)
        assert reply.body["message"] == "Authentication required"


async def test_cors_preflight_and_headers(droid_factory):
    app = await droid_factory(CORS_ORIGIN="http://good.example")
    api = Api(app.url)
    pre = await api.request("OPTIONS", "/tasks", headers={"Origin": "http://good.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "http://good.example"
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    evil = await api.get("/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    api.close()
