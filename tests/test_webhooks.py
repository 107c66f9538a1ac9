"""Webhooks (issue 23) against real receivers: a real HTTP server on 127.0.0.1 that records what
arrives, every delivery verified with the `standardwebhooks` package's own Webhook.verify.
Droid runs in-process (conftest's droid_factory) with DROID_WEBHOOK_ALLOW_PRIVATE=true (the
receiver is on loopback) and a shortened retry schedule."""
from __future__ import annotations

import asyncio
import re
import socket
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from standardwebhooks import Webhook, WebhookVerificationError

from conftest import Api, ISO_RE, wait_until
from droid.webhooks import service as webhook_service
from redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from webhook_receiver import Receiver, Reply

pytestmark = pytest.mark.asyncio

FAST = {"DROID_WEBHOOK_ALLOW_PRIVATE": "true", "DROID_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2"}


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = await Receiver().start()
    yield made
    await made.stop()


@pytest_asyncio.fixture
async def hooked(droid_factory):
    return await droid_factory(**FAST)


@pytest_asyncio.fixture
async def client(hooked) -> AsyncIterator[Api]:
    api = Api(hooked.url)
    yield api
    api.close()


async def add_endpoint(api: Api, token: str, url: str, **body: Any) -> dict:
    reply = await api.post("/webhooks", {"url": url, **body}, token=token)
    assert reply.status == 201, reply.body
    return reply.body


def verified(secret: str, got) -> dict:
    return Webhook(secret).verify(got.body, got.headers)


async def deliveries(api: Api, token: str, endpoint_id: str, query: str = "") -> list[dict]:
    reply = await api.get(f"/webhooks/{endpoint_id}/deliveries{query}", token=token)
    assert reply.status == 200, reply.body
    return reply.body["items"]


async def test_a_completed_task_is_delivered_signed(hooked, client, receiver) -> None:
    user = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url, description="my backend")
    assert endpoint["events"] == ["task.completed", "task.failed", "task.cancelled"]
    assert endpoint["secret"].startswith("whsec_") and endpoint["enabled"] is True
    assert endpoint["description"] == "my backend" and endpoint["disabledReason"] is None
    task = (await client.post("/tasks", {"prompt": "ship it"}, token=user["token"])).body
    got = (await receiver.wait_for(lambda: receiver.of("task.completed")))[0]
    body = verified(endpoint["secret"], got)
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "task.completed"
    data = body["data"]
    assert data["taskId"] == task["id"] and data["status"] == "completed"
    assert data["response"] and isinstance(data["seq"], int)
    # data is the stored envelope's data plus its seq, timestamp the envelope's
    envelopes = (await client.get("/events?after=0", token=user["token"])).body["items"]
    stored = next(e for e in envelopes if e["event"] == "task.completed")
    assert data == {**stored["data"], "seq": stored["seq"]}
    assert body["timestamp"] == stored["timestamp"]
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-signature"].startswith("v1,")
    # only the subscribed events: task.created and task.processing were not sent
    assert [r.json["type"] for r in receiver.received] == ["task.completed"]
    # a tampered body does not verify
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(got.body.replace(b"ship", b"sink"), got.headers)

    log = await deliveries(client, user["token"], endpoint["id"])
    assert len(log) == 1
    item = log[0]
    assert item["webhookId"] == got.headers["webhook-id"] and item["status"] == "succeeded"
    assert item["event"] == "task.completed" and item["seq"] == stored["seq"]
    assert item["endpointId"] == endpoint["id"] and item["nextAttemptAt"] is None
    [attempt] = item["attempts"]
    assert attempt["statusCode"] == 200 and attempt["response"] == "ok"
    assert attempt["error"] is None and attempt["durationMs"] >= 0
    assert re.match(ISO_RE, attempt["at"]) and re.match(ISO_RE, item["createdAt"])


async def test_chosen_events_are_delivered_in_each_endpoint(hooked, client, receiver) -> None:
    user = await client.register()
    every = await add_endpoint(client, user["token"], receiver.url + "?all",
                               events=["task.created", "task.processing", "task.completed",
                                       "task.created"])
    assert every["events"] == ["task.created", "task.processing", "task.completed"]
    failed_only = await add_endpoint(client, user["token"], receiver.url + "?failed",
                                     events=["task.failed"])
    await client.post("/tasks", {"prompt": "a"}, token=user["token"])
    await receiver.wait_for(lambda: len(receiver.received) >= 3)
    await wait_until(lambda: _settled(client, user["token"], every["id"], 3))
    kinds = sorted(r.json["type"] for r in receiver.received)
    assert kinds == ["task.completed", "task.created", "task.processing"]
    for got in receiver.received:
        verified(every["secret"], got)
    assert await deliveries(client, user["token"], failed_only["id"]) == []


async def _settled(api: Api, token: str, endpoint_id: str, n: int) -> bool:
    items = await deliveries(api, token, endpoint_id)
    return len(items) == n and all(i["status"] != "pending" for i in items)


async def test_retries_on_the_schedule_with_the_same_id(hooked, client, receiver) -> None:
    script = iter([Reply(500), Reply(503, body=b"busy"), Reply(200)])
    receiver.answer = lambda r: next(script, Reply(200))
    user = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    await client.post("/tasks", {"prompt": "retry me"}, token=user["token"])
    await receiver.wait_for(lambda: len(receiver.received) == 3)
    ids = {r.webhook_id for r in receiver.received}
    assert len(ids) == 1
    for got in receiver.received:
        assert verified(endpoint["secret"], got)["type"] == "task.completed"
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:])]
    assert all(gap >= 0.18 for gap in gaps), gaps
    await wait_until(lambda: _settled(client, user["token"], endpoint["id"], 1))
    [item] = await deliveries(client, user["token"], endpoint["id"])
    assert item["status"] == "succeeded"
    assert [a["statusCode"] for a in item["attempts"]] == [500, 503, 200]
    assert item["attempts"][1]["response"] == "busy"


async def test_exhausted_retries_fail_and_a_manual_retry_sends_again(hooked, client,
                                                                     receiver) -> None:
    receiver.answer = lambda r: Reply(502)
    user = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    await client.post("/tasks", {"prompt": "nobody home"}, token=user["token"])
    await receiver.wait_for(lambda: len(receiver.received) == 3)
    await wait_until(lambda: _settled(client, user["token"], endpoint["id"], 1))
    [failed] = await deliveries(client, user["token"], endpoint["id"], "?status=failed")
    assert [a["statusCode"] for a in failed["attempts"]] == [502, 502, 502]
    assert await deliveries(client, user["token"], endpoint["id"], "?status=succeeded") == []
    receiver.answer = lambda r: Reply(204)
    retried = await client.post(f"/webhooks/{endpoint['id']}/deliveries/{failed['id']}/retry",
                                token=user["token"])
    assert retried.status == 202 and retried.body["status"] == "pending"
    await receiver.wait_for(lambda: len(receiver.received) == 4)
    assert receiver.received[3].webhook_id == failed["webhookId"]
    verified(endpoint["secret"], receiver.received[3])
    await wait_until(lambda: _settled(client, user["token"], endpoint["id"], 1))
    [done] = await deliveries(client, user["token"], endpoint["id"], "?status=succeeded")
    assert [a["statusCode"] for a in done["attempts"]] == [502, 502, 502, 204]
    # unknown deliveries are 404
    again = await client.post(f"/webhooks/{endpoint['id']}/deliveries/nope/retry",
                              token=user["token"])
    assert again.status == 404


async def test_a_410_disables_the_endpoint_and_tells_the_owners_sockets(hooked, client,
                                                                        receiver,
                                                                        listen) -> None:
    receiver.answer = lambda r: Reply(410)
    user = await client.register()
    listener = await listen(hooked.url, user["token"])
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    await client.post("/tasks", {"prompt": "gone"}, token=user["token"])
    disabled = await listener.next("webhook.disabled", 10)
    assert disabled["id"] == endpoint["id"] and disabled["url"] == endpoint["url"]
    assert disabled["disabledReason"] == "The endpoint answered 410 Gone"
    assert len(receiver.received) == 1  # not retried
    shown = (await client.get(f"/webhooks/{endpoint['id']}", token=user["token"])).body
    assert shown["enabled"] is False and shown["disabledReason"] == disabled["disabledReason"]
    # nothing more is delivered to it, and no test event either
    await client.post("/tasks", {"prompt": "again"}, token=user["token"])
    await listener.wait_for(lambda: len(listener.of("task.completed")) == 2, 10)
    test = await client.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
    assert test.status == 409
    # enabled again, it starts from the present and clears the reason
    receiver.answer = lambda r: Reply(200)
    enabled = await client.request("PATCH", f"/webhooks/{endpoint['id']}", {"enabled": True},
                                   token=user["token"])
    assert enabled.status == 200 and enabled.body["enabled"] is True
    assert enabled.body["disabledReason"] is None
    await client.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
    await receiver.wait_for(lambda: receiver.of("webhook.test"))
    assert len(receiver.received) == 2


async def test_failing_for_too_long_disables_the_endpoint(droid_factory, receiver,
                                                          listen) -> None:
    app = await droid_factory(**{**FAST, "DROID_WEBHOOK_RETRY_SCHEDULE": "0,0.3,0.3,0.3,0.3,0.3",
                                 "DROID_WEBHOOK_DISABLE_AFTER_S": "1"})
    api = Api(app.url)
    try:
        receiver.answer = lambda r: Reply(500)
        user = await api.register()
        listener = await listen(app.url, user["token"])
        endpoint = await add_endpoint(api, user["token"], receiver.url)
        await api.post("/tasks", {"prompt": "down for days"}, token=user["token"])
        disabled = await listener.next("webhook.disabled", 10)
        assert disabled["disabledReason"].startswith("Failing since ")
        assert receiver.received[-1].at - receiver.received[0].at >= 0.95
        shown = (await api.get(f"/webhooks/{endpoint['id']}", token=user["token"])).body
        assert shown["enabled"] is False
    finally:
        api.close()


async def test_with_redis_webhook_disabled_reaches_the_sockets_of_every_process(
        droid_factory, receiver, listen, redis_server: RedisServer) -> None:
    """B neither makes nor sends deliveries: A disables the endpoint (a 410), and the owner's
    sockets on both hear it, B's through Redis."""
    env = {**FAST, "REDIS_URL": redis_server.url}
    a = await droid_factory(**env)
    b = await droid_factory(**env, DROID_WEBHOOK_CONCURRENCY="0")
    api = Api(b.url)
    try:
        receiver.answer = lambda r: Reply(410)
        user = await api.register()
        listeners = [await listen(a.url, user["token"]), await listen(b.url, user["token"])]
        for listener in listeners:
            await listener.next("connected")
        endpoint = await add_endpoint(api, user["token"], receiver.url)
        assert (await api.post(f"/webhooks/{endpoint['id']}/test",
                               token=user["token"])).status == 202
        for listener in listeners:
            disabled = await listener.next("webhook.disabled", 10)
            assert disabled["id"] == endpoint["id"]
            assert disabled["disabledReason"] == "The endpoint answered 410 Gone"
        assert len(receiver.received) == 1
    finally:
        api.close()


async def test_retry_after_is_honoured(hooked, client, receiver) -> None:
    script = iter([Reply(429, headers={"Retry-After": "2"}), Reply(200)])
    receiver.answer = lambda r: next(script, Reply(200))
    user = await client.register()
    await add_endpoint(client, user["token"], receiver.url)
    await client.post("/tasks", {"prompt": "slow down"}, token=user["token"])
    await receiver.wait_for(lambda: len(receiver.received) == 2, 15)
    gap = receiver.received[1].at - receiver.received[0].at
    assert gap >= 1.95, gap  # the schedule alone says 0.2 s


async def test_what_is_not_retried_and_what_is_not_followed(hooked, client, receiver) -> None:
    receiver.answer = lambda r: (Reply(302, headers={"Location": receiver.url + "/elsewhere"})
                                 if "redirect" in r.path else Reply(400, body=b"bad"))
    user = await client.register()
    bad = await add_endpoint(client, user["token"], receiver.url + "/bad")
    moved = await add_endpoint(client, user["token"], receiver.url + "/redirect")
    for endpoint in (bad, moved):
        assert (await client.post(f"/webhooks/{endpoint['id']}/test",
                                  token=user["token"])).status == 202
    await wait_until(lambda: _settled(client, user["token"], bad["id"], 1))
    await wait_until(lambda: _settled(client, user["token"], moved["id"], 1))
    assert sorted(r.path for r in receiver.received) == ["/hook/bad", "/hook/redirect"]
    for endpoint, code in ((bad, 400), (moved, 302)):
        [item] = await deliveries(client, user["token"], endpoint["id"])
        assert item["status"] == "failed" and item["event"] == "webhook.test"
        assert [a["statusCode"] for a in item["attempts"]] == [code]


async def test_timeouts_and_large_answers(droid_factory, receiver) -> None:
    app = await droid_factory(**FAST, DROID_WEBHOOK_TIMEOUT_S="0.5")
    api = Api(app.url)
    try:
        script = iter([Reply(200, delay_s=3), Reply(200, body=b"x" * (1024 * 1024))])
        receiver.answer = lambda r: next(script, Reply(200))
        user = await api.register()
        endpoint = await add_endpoint(api, user["token"], receiver.url)
        await api.post("/tasks", {"prompt": "answer slowly"}, token=user["token"])
        await wait_until(lambda: _settled(api, user["token"], endpoint["id"], 1), 10)
        [item] = await deliveries(api, user["token"], endpoint["id"])
        slow, big = item["attempts"]
        assert slow["statusCode"] is None and slow["error"] == "timed out after 0.5 s"
        assert 400 <= slow["durationMs"] < 2000
        # 1 MiB answered: the status counts, 64 KiB at most is read, 1 KiB is kept
        assert big["statusCode"] == 200 and big["response"] == "x" * 1024
        assert item["status"] == "succeeded"
    finally:
        api.close()


async def test_rotation_signs_with_both_secrets_for_a_day(hooked, client, receiver) -> None:
    user = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    rotated = await client.post(f"/webhooks/{endpoint['id']}/rotate-secret", token=user["token"])
    assert rotated.status == 200
    new = rotated.body["secret"]
    assert new.startswith("whsec_") and new != endpoint["secret"]
    await client.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
    got = (await receiver.wait_for(lambda: receiver.of("webhook.test")))[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    assert verified(new, got)["type"] == "webhook.test"
    assert verified(endpoint["secret"], got)["type"] == "webhook.test"
    # once the overlap is over, only the new secret signs
    await hooked.store.update_webhook(endpoint["id"], None, {
        "previousSecretUntil": (await hooked.store.webhook_by_id(endpoint["id"]))["createdAt"]})
    await client.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
    got = (await receiver.wait_for(lambda: receiver.of("webhook.test")[1:]))[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 1
    verified(new, got)
    with pytest.raises(WebhookVerificationError):
        verified(endpoint["secret"], got)


async def test_crud_validation_ownership_and_limits(hooked, client, receiver) -> None:
    user = await client.register()
    other = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    assert (await client.get("/webhooks", token=user["token"])).body == [
        {k: v for k, v in endpoint.items() if k != "secret"}]
    got = await client.get(f"/webhooks/{endpoint['id']}", token=user["token"])
    assert got.status == 200 and "secret" not in got.body
    patched = await client.request("PATCH", f"/webhooks/{endpoint['id']}",
                                   {"events": ["task.failed"], "description": "ops"},
                                   token=user["token"])
    assert patched.status == 200
    assert patched.body["events"] == ["task.failed"] and patched.body["description"] == "ops"
    for bad, message in (({"url": "ftp://x"}, "url must start with http:// or https://"),
                         ({"url": "http://u:p@127.0.0.1/"}, "url must not contain credentials"),
                         ({"url": "http://" + "a" * 2048}, "url must be at most 2048 characters"),
                         ({"url": receiver.url, "events": ["task.progress"]}, None),
                         ({"url": receiver.url, "events": []}, None)):
        reply = await client.post("/webhooks", bad, token=user["token"])
        assert reply.status == 400, (bad, reply.body)
        if message:
            assert reply.body["message"] == message
    for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/test"),
                         ("POST", "/rotate-secret"), ("GET", "/deliveries")):
        reply = await client.request(method, f"/webhooks/{endpoint['id']}{path}",
                                     {} if method == "PATCH" else None, token=other["token"])
        assert reply.status == 404, (method, path, reply.body)
        assert reply.body["message"] == "Webhook endpoint not found"
    more = await asyncio.gather(*(client.post("/webhooks", {"url": receiver.url},
                                              token=user["token"])
                                  for _ in range(webhook_service.MAX_ENDPOINTS)))
    assert sorted(r.status for r in more) == [201] * 9 + [409]
    assert next(r for r in more if r.status == 409).body["message"] == \
        "Webhook endpoint limit reached (10)"
    # deleting removes it and its deliveries
    await client.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
    await receiver.wait_for(lambda: receiver.received)
    deleted = await client.request("DELETE", f"/webhooks/{endpoint['id']}", token=user["token"])
    assert deleted.status == 204
    assert (await client.get(f"/webhooks/{endpoint['id']}", token=user["token"])).status == 404
    assert await hooked.store.deliveries_page(endpoint["id"], status=None, limit=5,
                                              after=None) == []


async def test_the_delivery_log_pages_newest_first(hooked, client, receiver) -> None:
    user = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    made = [(await client.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])).body
            for _ in range(5)]
    seen, cursor = [], None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(f"/webhooks/{endpoint['id']}/deliveries{query}",
                                 token=user["token"])).body
        seen += [d["id"] for d in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(d["id"] for d in made) and len(seen) == 5
    bad = await client.get(f"/webhooks/{endpoint['id']}/deliveries?status=lost",
                           token=user["token"])
    assert bad.status == 400
    bad = await client.get(f"/webhooks/{endpoint['id']}/deliveries?cursor=zzz",
                           token=user["token"])
    assert bad.status == 400 and bad.body["message"] == "cursor is invalid"


# server-side request forgery ---------------------------------------------------------------

REFUSED = {
    "loopback": ["127.0.0.1", "127.9.9.9", "[::1]", "[::ffff:127.0.0.1]", "localhost"],
    "private": ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "[fc00::1]",
                "[::ffff:10.0.0.1]"],
    "link-local": ["169.254.169.254", "[fe80::1]", "[::ffff:169.254.169.254]"],
    "multicast": ["224.0.0.1", "[ff02::1]"],
    "unspecified": ["0.0.0.0", "[::]", "[::ffff:0.0.0.0]"],
}


@pytest.mark.parametrize("allow_private", [False, True], ids=["default", "allow-private"])
async def test_endpoints_on_internal_addresses_are_refused(droid_factory, allow_private) -> None:
    app = await droid_factory(DROID_WEBHOOK_ALLOW_PRIVATE=str(allow_private).lower())
    api = Api(app.url)
    try:
        user = await api.register()
        for kind, hosts in REFUSED.items():
            for host in hosts:
                reply = await api.post("/webhooks", {"url": f"http://{host}:9/x"},
                                       token=user["token"])
                if allow_private and kind in ("loopback", "private"):
                    assert reply.status == 201, (host, reply.body)
                    await api.request("DELETE", f"/webhooks/{reply.body['id']}",
                                      token=user["token"])
                    continue
                assert reply.status == 400, (host, reply.body)
                assert f" a {kind} address (" in reply.body["message"], (host, reply.body)
        named = await api.post("/webhooks", {"url": "http://localhost:9/x"}, token=user["token"])
        if not allow_private:
            assert named.body["message"].startswith("url host localhost resolves to a loopback "
                                                    "address (")
    finally:
        api.close()


def fake_dns(table: dict[str, str]):
    async def lookup(host: str, port: int) -> list[tuple]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        address = table[host]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
    return lookup


async def test_addresses_are_checked_again_at_each_delivery(droid_factory, receiver) -> None:
    """A name that was public when the endpoint was saved and points inside later (DNS
    rebinding) is refused at delivery, before any connection."""
    app = await droid_factory(DROID_WEBHOOK_RETRY_SCHEDULE="0,0.2")
    dns = {"hooks.example": "93.184.216.34"}
    app.webhooks.lookup = fake_dns(dns)
    api = Api(app.url)
    try:
        user = await api.register()
        endpoint = await add_endpoint(api, user["token"], f"http://hooks.example:{receiver.port}/")
        dns["hooks.example"] = "127.0.0.1"
        await api.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
        await wait_until(lambda: _settled(api, user["token"], endpoint["id"], 1))
        [item] = await deliveries(api, user["token"], endpoint["id"])
        assert item["status"] == "failed"
        [attempt] = item["attempts"]  # refused: not retried
        assert attempt["statusCode"] is None
        assert attempt["error"].startswith("url host hooks.example resolves to a loopback "
                                           "address (127.0.0.1)")
        assert receiver.received == []
        unknown = await api.post("/webhooks", {"url": "http://nowhere.example/"},
                                 token=user["token"])
        assert unknown.status == 400
        assert unknown.body["message"] == "url host nowhere.example cannot be resolved"
    finally:
        api.close()


async def test_the_connection_goes_to_the_checked_address(droid_factory, receiver) -> None:
    app = await droid_factory(**FAST)
    app.webhooks.lookup = fake_dns({"receiver.test": "127.0.0.1"})
    api = Api(app.url)
    try:
        user = await api.register()
        endpoint = await add_endpoint(api, user["token"], f"http://receiver.test:{receiver.port}/x")
        await api.post(f"/webhooks/{endpoint['id']}/test", token=user["token"])
        got = (await receiver.wait_for(lambda: receiver.received))[0]
        assert got.headers["host"] == f"receiver.test:{receiver.port}"
        verified(endpoint["secret"], got)
    finally:
        api.close()


async def test_metrics_count_deliveries_by_outcome(hooked, client, receiver) -> None:
    script = iter([Reply(500), Reply(200)])
    receiver.answer = lambda r: next(script, Reply(200))
    user = await client.register()
    endpoint = await add_endpoint(client, user["token"], receiver.url)
    await client.post("/tasks", {"prompt": "count me"}, token=user["token"])
    await receiver.wait_for(lambda: len(receiver.received) == 2)
    await wait_until(lambda: _settled(client, user["token"], endpoint["id"], 1))
    text = (await client.get("/metrics")).body
    assert 'droid_webhook_deliveries_total{outcome="retrying"} 1.0' in text
    assert 'droid_webhook_deliveries_total{outcome="succeeded"} 1.0' in text
    assert 'droid_webhook_attempt_seconds_count{outcome="succeeded"} 1.0' in text
