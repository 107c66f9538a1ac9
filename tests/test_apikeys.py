"""API keys (issue 23): created once, stored as a hash, accepted wherever a JWT is (REST,
Socket.IO, SSE) within their scope, revoked at once on every process with their sockets
disconnected. Real servers, real clients; two instances on one database for "every process",
with and without Redis."""
from __future__ import annotations

import asyncio
import hashlib
import re

import pytest
import socketio
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import Api, wait_until
from droid import apikeys
from droid.util import dumps
from redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

KEY_RE = re.compile(r"^droid_sk_[A-Za-z0-9_-]{43}$")


async def new_key(api: Api, token: str, name: str = "ci", scope: str | None = "write") -> dict:
    body = {"name": name} if scope is None else {"name": name, "scope": scope}
    reply = await api.post("/api-keys", body, token=token)
    assert reply.status == 201, reply.body
    return reply.body


async def test_a_key_is_shown_once_and_only_its_hash_is_stored(droid, api) -> None:
    user = await api.register()
    made = await new_key(api, user["token"], scope=None)
    assert KEY_RE.match(made["key"]), made["key"]
    assert made["prefix"] == made["key"][:17] and made["scope"] == "write"
    assert made["lastUsedAt"] is None and set(made) == {
        "id", "name", "prefix", "scope", "createdAt", "lastUsedAt", "key"}
    stored = await droid.store.api_keys_of(user["id"])
    assert len(stored) == 1
    assert stored[0]["keyHash"] == hashlib.sha256(made["key"].encode()).hexdigest()
    assert made["key"] not in repr(stored)  # the key itself is nowhere

    second = await new_key(api, user["token"], "read-only", "read")
    listed = await api.get("/api-keys", token=user["token"])
    assert listed.status == 200
    assert [k["id"] for k in listed.body] == [made["id"], second["id"]]  # oldest first
    assert all("key" not in k for k in listed.body)


async def test_last_used_is_written_at_most_once_a_minute(droid, api) -> None:
    user = await api.register()
    key = (await new_key(api, user["token"]))["key"]
    assert (await api.get("/tasks", token=key)).status == 200
    first = (await api.get("/api-keys", token=key)).body[0]["lastUsedAt"]
    assert first is not None
    for _ in range(3):
        assert (await api.get("/tasks", token=key)).status == 200
    assert (await api.get("/api-keys", token=key)).body[0]["lastUsedAt"] == first


async def test_a_key_works_on_rest_sockets_and_sse_as_its_user(droid, api, listen) -> None:
    user = await api.register()
    other = await api.register()
    key = (await new_key(api, user["token"]))["key"]
    me = await api.get("/auth/me", token=key)
    assert me.status == 200 and me.body["id"] == user["id"]
    listener = await listen(droid.url, key)
    connected = await listener.next("connected")
    assert connected["userId"] == user["id"]
    task = await api.post("/tasks", {"prompt": "hello"}, token=key)
    assert task.status == 201 and task.body["userId"] == user["id"]
    done = await listener.next("task.completed", 10)
    assert done["data"]["taskId"] == task.body["id"]
    # another user's task is not found with this key
    theirs = await api.post("/tasks", {"prompt": "mine"}, token=other["token"])
    assert (await api.get(f"/tasks/{theirs.body['id']}", token=key)).status == 404

    # SSE with ?token= (EventSource cannot send headers)
    lines: list[bytes] = []
    enough = asyncio.Event()

    def on_chunk(chunk: bytes) -> None:
        lines.append(chunk)
        if b"event: task.completed" in b"".join(lines):
            enough.set()

    http = AsyncHTTPClient(force_instance=True)
    stream = asyncio.ensure_future(http.fetch(HTTPRequest(
        f"{droid.url}/events/stream?after=0&token={key}", streaming_callback=on_chunk,
        request_timeout=30), raise_error=False))
    try:
        await asyncio.wait_for(enough.wait(), 10)
    finally:
        stream.cancel()
        http.close()


async def test_a_read_key_reads_and_may_not_change_anything(droid, api, listen) -> None:
    user = await api.register()
    read = await new_key(api, user["token"], "reader", "read")
    write = await new_key(api, user["token"], "writer", "write")
    key = read["key"]
    for path in ("/tasks", "/agents", "/events", "/api-keys", "/webhooks", "/auth/me"):
        assert (await api.get(path, token=key)).status == 200, path
    refused = [await api.post("/tasks", {"prompt": "no"}, token=key),
               await api.post("/agents", {"name": "no"}, token=key),
               await api.post("/api-keys", {"name": "no"}, token=key),
               await api.request("DELETE", f"/api-keys/{write['id']}", token=key),
               await api.post("/webhooks", {"url": "https://example.com"}, token=key)]
    for reply in refused:
        assert reply.status == 403, reply.body
        assert reply.body == {"statusCode": 403, "error": "Forbidden",
                              "message": "API key scope does not allow this"}
    assert len((await api.get("/api-keys", token=user["token"])).body) == 2
    # opening /events is reading
    listener = await listen(droid.url, key)
    assert (await listener.next("connected"))["userId"] == user["id"]
    # a write key manages keys
    third = await api.post("/api-keys", {"name": "made by a key"}, token=write["key"])
    assert third.status == 201
    assert (await api.request("DELETE", f"/api-keys/{third.body['id']}",
                              token=write["key"])).status == 204


async def test_unknown_and_malformed_keys_are_refused(droid, api, listen) -> None:
    await api.register()
    for key in ("droid_sk_" + "A" * 43, "droid_sk_", "droid_sk_" + "x" * 5000):
        reply = await api.get("/tasks", token=key)
        assert reply.status == 401 and reply.body["message"] == "Invalid API key", reply.body
        listener = socketio.AsyncClient(reconnection=False)
        errors: list = []
        listener.on("connect_error", lambda data: errors.append(data), namespace="/events")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await listener.connect(droid.url, namespaces=["/events"], auth={"token": key},
                                   transports=["websocket"], wait_timeout=5)
        assert errors and errors[0]["message"] == "Invalid API key"
    # a key on a route that needs no authentication changes nothing
    assert (await api.get("/health", token="droid_sk_nope")).status == 200


async def test_validation_limit_and_ownership(droid, api) -> None:
    user = await api.register()
    other = await api.register()
    for body, message in (({"name": ""}, "name must be a non-empty string"),
                          ({"name": "x", "scope": "admin"}, "scope must be one of read or write"),
                          ({"scope": "read"}, "name is required")):
        reply = await api.post("/api-keys", body, token=user["token"])
        assert reply.status == 400 and reply.body["message"] == message, reply.body
    keys = await asyncio.gather(*(api.post("/api-keys", {"name": f"k{i}"}, token=user["token"])
                                  for i in range(apikeys.MAX_KEYS)))
    assert [k.status for k in keys] == [201] * apikeys.MAX_KEYS
    over = await api.post("/api-keys", {"name": "one too many"}, token=user["token"])
    assert over.status == 409
    assert over.body == {"statusCode": 409, "error": "Conflict",
                         "message": "API key limit reached (20)"}
    mine = keys[0].body["id"]
    assert (await api.request("DELETE", f"/api-keys/{mine}", token=other["token"])).status == 404
    assert (await api.request("DELETE", "/api-keys/nope", token=user["token"])).status == 404
    deleted = await api.request("DELETE", f"/api-keys/{mine}", token=user["token"])
    assert deleted.status == 204 and deleted.body == ""
    assert (await api.post("/api-keys", {"name": "room again"}, token=user["token"])).status \
        == 201


async def revoke_everywhere(droid_factory, listen, **env) -> None:
    """Two instances on one database: a key revoked on A is refused on B at once, and the
    sockets opened with it on both are disconnected (a JWT socket of the same user stays)."""
    a = await droid_factory(**env)
    b = await droid_factory(**env)
    api_a, api_b = Api(a.url), Api(b.url)
    try:
        user = await api_a.register()
        made = await new_key(api_a, user["token"])
        key = made["key"]
        keyed = [await listen(a.url, key), await listen(b.url, key)]
        jwt = await listen(b.url, user["token"])
        for listener in (*keyed, jwt):
            await listener.next("connected")
        assert (await api_b.get("/tasks", token=key)).status == 200
        assert (await api_a.request("DELETE", f"/api-keys/{made['id']}",
                                    token=user["token"])).status == 204
        refused = await api_b.get("/tasks", token=key)
        assert refused.status == 401 and refused.body["message"] == "Invalid API key"
        for listener in keyed:
            revoked = await listener.next("auth.revoked", 10)
            assert revoked["message"] == "API key revoked"
            await wait_until(lambda listener=listener: _disconnected(listener), 10)
        assert jwt.client.connected
        assert (await api_b.get("/tasks", token=user["token"])).status == 200
    finally:
        api_a.close()
        api_b.close()


async def _disconnected(listener) -> bool:
    return not listener.client.connected


async def test_a_revoked_key_is_refused_and_its_sockets_disconnected(droid_factory, listen,
                                                                     monkeypatch) -> None:
    # Without Redis the other instance finds out with its sweep of the keys its sockets use.
    monkeypatch.setattr(apikeys, "KEY_SWEEP_S", 0.3)
    await revoke_everywhere(droid_factory, listen)


async def test_with_redis_a_revocation_reaches_every_process_at_once(
        droid_factory, listen, redis_server: RedisServer, monkeypatch) -> None:
    monkeypatch.setattr(apikeys, "KEY_SWEEP_S", 3600.0)  # only the notice can do it
    await revoke_everywhere(droid_factory, listen, REDIS_URL=redis_server.url)


async def test_keys_never_reach_the_log(droid, api,
                                                                        caplog) -> None:
    user = await api.register()
    made = await new_key(api, user["token"])
    await api.get("/tasks", token=made["key"])
    await api.get("/tasks", token="droid_sk_wrong")
    assert made["key"] not in caplog.text
    assert "droid_sk_wrong" not in caplog.text
    assert dumps(made["key"]).decode() not in caplog.text
