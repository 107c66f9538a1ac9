"""HTTP edges: body limits, unknown routes and methods, health, OpenAPI, the page and its
files, who may read /metrics, and refused browser origins."""
import asyncio
import ipaddress
import logging
import socket

import pytest
import socketio
import tornado.httpclient
import tornado.netutil
import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import Api, make_config
from droid.app import make_app
from droid.util import loads

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
                 "/tasks/{id}/cancel", "/events", "/events/stream", "/metrics", "/health",
                 "/api-keys", "/api-keys/{id}", "/webhooks", "/webhooks/{id}",
                 "/webhooks/{id}/rotate-secret", "/webhooks/{id}/test",
                 "/webhooks/{id}/deliveries", "/webhooks/{id}/deliveries/{deliveryId}/retry"):
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
                         ("POST", "/tasks/x/cancel"), ("GET", "/events")):
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


# /metrics: the operator's METRICS_TOKEN, not user tokens -------------------------------------

METRICS_TOKEN = "metrics-token-for-the-tests-0123456789"


async def test_metrics_need_the_metrics_token_when_it_is_set(droid_factory):
    app = await droid_factory(METRICS_TOKEN=METRICS_TOKEN)
    api = Api(app.url)
    user = await api.register()
    for token, message in ((None, "Authentication required"),
                           (user["token"], "Invalid metrics token"),  # a user's JWT opens nothing
                           (METRICS_TOKEN + "x", "Invalid metrics token")):
        reply = await api.get("/metrics", token=token)
        assert reply.status == 401, (token, reply.body)
        assert reply.body == {"statusCode": 401, "error": "Unauthorized", "message": message}
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    basic = await api.get("/metrics", headers={"Authorization": "Basic " + METRICS_TOKEN})
    assert basic.status == 401
    reply = await api.get("/metrics", token=METRICS_TOKEN)
    assert reply.status == 200 and "droid_tasks" in reply.body
    api.close()


async def test_metrics_without_a_token_are_open_on_loopback_in_development(droid_factory):
    app = await droid_factory(DROID_ENV="development")
    api = Api(app.url)
    # A forwarded address does not make a loopback client remote, nor a remote one local:
    # what counts is the connection's own peer.
    reply = await api.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9",
                                               "X-Real-Ip": "203.0.113.9"})
    assert reply.status == 200 and "droid_socket_connections" in reply.body
    api.close()


async def test_metrics_without_a_token_are_refused_in_production(droid_factory):
    app = await droid_factory(DROID_ENV="production", MONGODB_URI="mongodb://127.0.0.1:1/x")
    api = Api(app.url)
    user = await api.register()
    for token in (None, user["token"]):
        reply = await api.get("/metrics", token=token)
        assert reply.status == 403
        assert reply.body["statusCode"] == 403 and "METRICS_TOKEN" in reply.body["message"]
    api.close()


def _local_address() -> str:
    """This machine's address on its default route (no packet is sent: UDP connect only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        return probe.getsockname()[0]


async def test_metrics_without_a_token_are_refused_to_other_hosts_in_development(shared_store):
    address = _local_address()
    assert not ipaddress.ip_address(address).is_loopback
    app = await make_app(make_config(DROID_ENV="development"), store=shared_store)
    sockets = tornado.netutil.bind_sockets(0, address)
    await app.start(sockets)
    try:
        api = Api(f"http://{address}:{app.port}")
        reply = await api.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1",
                                                   "X-Real-Ip": "127.0.0.1"})
        assert reply.status == 403 and "METRICS_TOKEN" in reply.body["message"]
        assert (await api.get("/health")).status == 200
        api.close()
    finally:
        await app.stop()


# unknown paths: JSON 404 everywhere but the page's own HTML ----------------------------------

async def test_the_page_assets_and_the_vendored_client_are_served(droid):
    http = AsyncHTTPClient()
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css"),
                       ("/static/vendor/socket.io.min.js", "javascript")):
        reply = await http.fetch(droid.url + path)
        assert reply.code == 200 and kind in reply.headers["Content-Type"], path
        assert reply.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/favicon.ico", "/robots.txt", "/static/nope.js",
                                  "/static/vendor/nope.js", "/static/", "/static/vendor",
                                  "/static/vendor/", "/index.html", "/static/%00", "/nope/deeper"])
async def test_every_unknown_path_is_a_json_404(api, path):
    reply = await api.get(path)
    assert reply.status == 404, (path, reply.body)
    assert reply.headers["Content-Type"].startswith("application/json"), path
    assert reply.body == {"statusCode": 404, "error": "Not Found",
                          "message": f"Cannot GET {reply.body['message'][len('Cannot GET '):]}"}
    assert reply.body["message"].startswith("Cannot GET /"), path
    assert "ETag" not in reply.headers


async def test_a_path_out_of_the_static_folder_is_a_json_404(droid):
    for raw in (b"/static/../setup.cfg", b"/static/%2e%2e/setup.cfg", b"/static/../../etc/passwd"):
        reader, writer = await asyncio.open_connection("127.0.0.1", droid.port)
        writer.write(b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404"), (raw, head)
        assert b"application/json" in head and b'"statusCode":404' in body, raw


async def test_other_methods_on_the_page_and_its_files_use_the_error_shape(api):
    for path, allow in (("/", "GET"), ("/static/app.js", "GET, HEAD")):
        reply = await api.post(path, {})
        assert reply.status == 405, path
        assert reply.body["statusCode"] == 405 and reply.body["error"] == "Method Not Allowed"
        assert "GET" in reply.headers["Allow"] and allow in reply.headers["Allow"]


# a refused origin: one WARNING line with the origin ------------------------------------------

def _polling(app_url: str, origin: str) -> HTTPRequest:
    return HTTPRequest(app_url + "/socket.io/?EIO=4&transport=polling", headers={"Origin": origin},
                       request_timeout=10)


async def test_a_refused_origin_is_logged_once_at_warning_with_the_origin(droid_factory, caplog):
    app = await droid_factory(CORS_ORIGIN="http://good.example")
    http = AsyncHTTPClient(force_instance=True)
    evil = "http://evil.example"
    with caplog.at_level(logging.DEBUG):
        polling = await http.fetch(_polling(app.url, evil), raise_error=False)
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await tornado.websocket.websocket_connect(HTTPRequest(
                app.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket",
                headers={"Origin": evil}, request_timeout=10))
    assert polling.code == 403 and refused.value.code == 403
    assert loads(polling.body) == {"statusCode": 403, "error": "Forbidden",
                                   "message": "Origin not allowed"}
    about = [r for r in caplog.records if evil in r.getMessage()]
    assert [(r.levelname, r.name) for r in about] == [("WARNING", "droid.cors")] * 2, \
        [(r.levelname, r.name, r.getMessage()) for r in about]
    assert "long-polling" in about[0].getMessage() and "WebSocket" in about[1].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.name.startswith(("engineio", "socketio"))]
    http.close()


async def test_allowed_and_same_host_origins_are_served_with_cors_headers(droid_factory, caplog):
    app = await droid_factory(CORS_ORIGIN="http://good.example")
    http = AsyncHTTPClient(force_instance=True)
    good = await http.fetch(_polling(app.url, "http://good.example"))
    assert good.code == 200 and good.body.startswith(b"0{")
    assert good.headers["Access-Control-Allow-Origin"] == "http://good.example"
    # The demo page served by this process is not cross-origin, whatever CORS_ORIGIN says.
    own = await http.fetch(_polling(app.url, app.url))
    assert own.code == 200 and own.body.startswith(b"0{")
    listener = socketio.AsyncClient(reconnection=False)
    await listener.connect(app.url, transports=["websocket"], namespaces=["/events"],
                           auth={"token": (await Api(app.url).register())["token"]},
                           headers={"Origin": "http://good.example"}, wait_timeout=5)
    await listener.disconnect()
    assert not [r for r in caplog.records if r.name == "droid.cors"]
    http.close()


async def test_any_origin_is_served_when_cors_origin_is_a_star(droid):
    http = AsyncHTTPClient(force_instance=True)
    reply = await http.fetch(_polling(droid.url, "http://anywhere.example"))
    assert reply.code == 200
    assert reply.headers["Access-Control-Allow-Origin"] == "http://anywhere.example"
    http.close()
