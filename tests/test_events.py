"""The /events namespace with python-socketio's client: authentication, refusals, rooms, client
events, transports, isolation between users, and every task event's envelope and fields."""
from __future__ import annotations

import re
import time

import jwt
import pytest
import socketio

from conftest import ISO_RE, TEST_SECRET, Api, Listener
from droid.tasks.llm import AgentError

pytestmark = pytest.mark.asyncio

TASK_FIELDS = {"id", "userId", "agentId", "status", "priority", "prompt", "response", "error",
               "tokensUsed", "executionTimeMs", "retryCount", "metadata", "createdAt",
               "updatedAt", "startedAt", "completedAt"}
BASE = {"taskId", "userId", "agentId", "status"}
# The contract's table: what each event's data holds at least, and which of those are dates.
EVENT_FIELDS = {
    "task.created": TASK_FIELDS | {"taskId"},
    "task.processing": BASE | {"retryCount", "startedAt", "updatedAt"},
    "task.completed": BASE | {"response", "tokensUsed", "executionTimeMs", "completedAt",
                              "updatedAt"},
    "task.failed": BASE | {"error", "retryCount", "completedAt", "updatedAt"},
    "task.cancelled": BASE | {"updatedAt"},
    "task.progress": {"taskId", "userId", "agentId", "delta", "updatedAt"},
}
DATES = {"createdAt", "updatedAt", "startedAt", "completedAt"}


def mint(user_id: str, expires_in: float = 3600, secret: str = TEST_SECRET,
         exp: int | None = None) -> str:
    """A token as Droid issues it, with any lifetime (negative: already expired), or expiring
    at `exp` (seconds since the epoch)."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": exp or int(now + expires_in)}, secret,
                      algorithm="HS256")


def check_envelope(envelope: dict, event: str, task_id: str, user_id: str) -> None:
    """The envelope {event, data, timestamp, seq} and the data fields the contract promises."""
    assert set(envelope) == {"event", "data", "timestamp", "seq"}
    assert envelope["event"] == event
    assert re.match(ISO_RE, envelope["timestamp"])
    data = envelope["data"]
    assert EVENT_FIELDS[event] <= set(data), EVENT_FIELDS[event] - set(data)
    assert data["taskId"] == task_id and data["userId"] == user_id
    for field in DATES & set(data):
        if data[field] is not None or field in ("createdAt", "updatedAt"):
            assert re.match(ISO_RE, data[field]), (field, data[field])
    if event == "task.progress":
        assert envelope["seq"] is None  # not stored, so not numbered
    else:
        assert isinstance(envelope["seq"], int) and envelope["seq"] >= 1
        assert data["status"] == ("pending" if event == "task.created" else event[5:])


async def finished(listener, task_id: str, event: str = "task.completed") -> dict:
    """Wait for a task's event on the generic `task.event`, which is sent last."""
    return await listener.next("task.event", where=lambda e: e["event"] == event
                               and e["data"]["taskId"] == task_id)


def task_events(listener, task_id: str) -> list[dict]:
    """The envelopes of one task, in arrival order, from the generic `task.event`."""
    return [e for e in listener.of("task.event") if e["data"]["taskId"] == task_id]


async def connected(listen, url: str, token: str | None = None, **kw):
    listener = await listen(url, token, **kw)
    await listener.next("connected")
    return listener


# authentication -------------------------------------------------------------------------------

@pytest.mark.parametrize("way", ["auth", "auth-bearer", "header", "query"])
async def test_every_way_of_sending_the_token_is_accepted(droid, api, listen, way):
    user = await api.register()
    token = user["token"]
    url, kw = droid.url, {}
    if way == "auth":
        kw["auth"] = {"token": token}
    elif way == "auth-bearer":
        kw["auth"] = {"token": f"Bearer {token}"}
    elif way == "header":
        kw["headers"] = {"Authorization": f"Bearer {token}"}
    else:
        url += f"?token={token}"
    listener = await listen(url, None, **kw)
    hello = await listener.next("connected")
    assert hello["userId"] == user["id"]
    assert hello["clientId"] == listener.client.get_sid("/events")
    assert hello["message"] == "Successfully connected to real-time events"
    assert re.match(ISO_RE, hello["timestamp"])


async def test_the_first_token_found_wins(droid, api, listen):
    """auth.token comes before the header, which comes before the query parameter."""
    alice, bob = await api.register(), await api.register()
    both = await connected(listen, f"{droid.url}?token={bob['token']}", alice["token"],
                           headers={"Authorization": f"Bearer {bob['token']}"})
    assert both.of("connected")[0]["userId"] == alice["id"]
    header = await connected(listen, f"{droid.url}?token={alice['token']}",
                             headers={"Authorization": f"Bearer {bob['token']}"})
    assert header.of("connected")[0]["userId"] == bob["id"]
    with pytest.raises(socketio.exceptions.ConnectionError):
        await listen(droid.url, "not-a-jwt", headers={"Authorization": f"Bearer {bob['token']}"})


@pytest.mark.parametrize("token, message", [
    (None, "Authentication required"),
    ("", "Authentication required"),
    ("expired", "Token expired"),
    ("not-a-jwt", "Invalid token"),
    ("wrong-key", "Invalid token"),
    ("no-sub", "Invalid token"),
])
async def test_refusals_carry_the_contract_message_and_code_401(droid, token, message):
    if token == "expired":
        token = mint("someone", expires_in=-60)
    elif token == "wrong-key":
        token = mint("someone", secret="another-secret-that-is-long-enough-to-use")
    elif token == "no-sub":
        token = jwt.encode({"exp": int(time.time()) + 60}, TEST_SECRET, algorithm="HS256")
    listener = Listener()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await listener.connect(droid.url, auth={"token": token} if token is not None else None)
    assert listener.connect_error == {"message": message, "data": {"code": 401}}
    assert not droid.gateway.sockets and listener.events == []


@pytest.mark.parametrize("namespace", ["/", "/other"])
async def test_other_namespaces_are_refused(droid, api, namespace):
    user = await api.register()
    client = socketio.AsyncClient(reconnection=False)
    errors = []
    client.on("connect_error", lambda data=None: errors.append(data), namespace=namespace)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(droid.url, namespaces=[namespace], auth={"token": user["token"]},
                             transports=["websocket"], wait_timeout=5)
    assert errors == [{"message": "Invalid namespace"}]
    await client.disconnect()


# presence and client events -------------------------------------------------------------------

async def test_two_tabs_of_one_user_see_the_count_go_up_and_down(droid, api, listen):
    user = await api.register()
    first = await connected(listen, droid.url, user["token"])
    assert (await first.next("connections.count")) == {"count": 1}
    second = await connected(listen, droid.url, user["token"])
    assert (await second.next("connections.count")) == {"count": 2}
    await first.next("connections.count", where=lambda d: d["count"] == 2)
    await second.close()
    await first.wait_for(lambda: first.of("connections.count")[-1] == {"count": 1})
    assert [d["count"] for d in first.of("connections.count")] == [1, 2, 1]


async def test_ping_is_answered_by_pong_and_by_the_acknowledgement(droid, api, listen):
    user = await api.register()
    tab = await connected(listen, droid.url, user["token"])
    ack = await tab.client.call("ping", {"message": "Hello"}, namespace="/events", timeout=5)
    pong = await tab.next("pong")
    assert ack == pong
    assert pong["message"] == "Hello" and pong["clientId"] == tab.client.get_sid("/events")
    assert re.match(ISO_RE, pong["timestamp"])
    bare = await tab.client.call("ping", namespace="/events", timeout=5)
    assert set(bare) == {"timestamp", "clientId", "message"}


async def test_an_unsubscribed_tab_gets_no_task_events_until_it_subscribes(droid_factory, listen):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    quiet = await connected(listen, app.url, user["token"])
    other = await connected(listen, app.url, user["token"])
    reply = await quiet.client.call("unsubscribe.tasks", namespace="/events", timeout=5)
    assert reply == await quiet.next("unsubscribed.tasks")
    assert reply["userId"] == user["id"] and re.match(ISO_RE, reply["timestamp"])
    assert reply["message"]

    first = (await api.post("/tasks", {"prompt": "one"}, token=user["token"])).body
    await other.next("task.created", where=lambda e: e["data"]["id"] == first["id"])
    # A pong is queued after anything the publish queued for this socket: a barrier.
    await quiet.client.call("ping", namespace="/events", timeout=5)
    assert quiet.of("task.created") == [] and quiet.of("task.event") == []

    reply = await quiet.client.call("subscribe.tasks", namespace="/events", timeout=5)
    assert reply == await quiet.next("subscribed.tasks") and reply["userId"] == user["id"]
    second = (await api.post("/tasks", {"prompt": "two"}, token=user["token"])).body
    got = await quiet.next("task.created")
    assert got["data"]["id"] == second["id"]
    await other.next("task.created", where=lambda e: e["data"]["id"] == second["id"])
    api.close()


# transports and isolation ---------------------------------------------------------------------

@pytest.mark.parametrize("transports, final", [(["polling", "websocket"], "websocket"),
                                               (["polling"], "polling"),
                                               (["websocket"], "websocket")])
async def test_each_transport_carries_task_events(droid, api, listen, transports, final):
    user = await api.register()
    tab = await connected(listen, droid.url, user["token"], transports=transports)
    task = (await api.post("/tasks", {"prompt": "hi"}, token=user["token"])).body
    done = await tab.next("task.completed", where=lambda e: e["data"]["taskId"] == task["id"])
    assert done["data"]["response"]
    assert tab.client.transport() == final


async def test_a_second_user_receives_nothing_of_the_first(droid, api, listen):
    alice, bob = await api.register(), await api.register()
    alices = await connected(listen, droid.url, alice["token"])
    bobs = await connected(listen, droid.url, bob["token"])
    task = (await api.post("/tasks", {"prompt": "private"}, token=alice["token"])).body
    await alices.next("task.completed", where=lambda e: e["data"]["taskId"] == task["id"])
    await bobs.client.call("ping", namespace="/events", timeout=5)
    assert {name for name, _ in bobs.events} == {"connected", "connections.count", "pong"}
    assert bobs.of("connections.count") == [{"count": 1}]


# task events ----------------------------------------------------------------------------------

async def test_a_task_emits_created_processing_progress_completed_in_order(droid, api, listen):
    user = await api.register()
    tab = await connected(listen, droid.url, user["token"])
    task = (await api.post("/tasks", {"prompt": "Tell me a story"}, token=user["token"])).body
    await finished(tab, task["id"])

    envelopes = task_events(tab, task["id"])
    names = [e["event"] for e in envelopes]
    assert names[0] == "task.created" and names[1] == "task.processing"
    assert names[-1] == "task.completed"
    assert set(names[2:-1]) == {"task.progress"} and len(names) > 3
    for envelope in envelopes:
        check_envelope(envelope, envelope["event"], task["id"], user["id"])
    # Each specific event is sent too, with the very same envelope, just before task.event.
    specific = [(n, d) for n, d in tab.events if n.startswith("task.") and n != "task.event"
                and d["data"]["taskId"] == task["id"]]
    assert [d for _, d in specific] == envelopes and [n for n, _ in specific] == names
    pairs = [(n, d) for n, d in tab.events if n.startswith("task.")]
    for i in range(0, len(pairs), 2):
        assert pairs[i + 1] == ("task.event", pairs[i][1])

    created = envelopes[0]["data"]
    assert {k: created[k] for k in TASK_FIELDS} == task and created["taskId"] == task["id"]
    seqs = [e["seq"] for e in envelopes if e["seq"] is not None]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    done = envelopes[-1]["data"]
    assert "".join(e["data"]["delta"] for e in envelopes[2:-1]) == done["response"]
    assert done["tokensUsed"] > 0 and done["executionTimeMs"] >= 0
    assert envelopes[1]["data"]["retryCount"] == 0


class FailingProvider:
    """An agent that always fails for good."""

    async def run(self, **_):
        raise AgentError("The model refused", retryable=False)

    async def close(self) -> None:
        pass


async def test_a_failing_task_emits_task_failed(droid_factory, listen):
    app = await droid_factory(provider=FailingProvider())
    api = Api(app.url)
    user = await api.register()
    tab = await connected(listen, app.url, user["token"])
    task = (await api.post("/tasks", {"prompt": "x"}, token=user["token"])).body
    failed = await finished(tab, task["id"], "task.failed")
    check_envelope(failed, "task.failed", task["id"], user["id"])
    assert failed["data"]["error"] == "The model refused"
    assert [e["event"] for e in task_events(tab, task["id"])] == [
        "task.created", "task.processing", "task.failed"]
    api.close()


async def test_cancel_emits_task_cancelled(droid_factory, listen):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    tab = await connected(listen, app.url, user["token"])
    task = (await api.post("/tasks", {"prompt": "x"}, token=user["token"])).body
    reply = await api.post(f"/tasks/{task['id']}/cancel", token=user["token"])
    assert reply.status == 200
    cancelled = await finished(tab, task["id"], "task.cancelled")
    check_envelope(cancelled, "task.cancelled", task["id"], user["id"])
    assert cancelled["data"]["updatedAt"] == reply.body["updatedAt"]
    assert [e["event"] for e in task_events(tab, task["id"])] == ["task.created",
                                                                   "task.cancelled"]
    assert cancelled["seq"] == tab.of("task.created")[0]["seq"] + 1
    api.close()
