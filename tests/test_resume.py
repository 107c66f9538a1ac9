"""Missing nothing over /events: replay after auth.lastSeq or subscribe.tasks {lastSeq}, with no
gap and no duplicate even while events are being published, and `resync` when the client's
lastSeq is older than what is kept."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from conftest import publish_event
from test_events import mint

pytestmark = pytest.mark.asyncio


def seqs(listener, name: str = "task.event") -> list[int]:
    return [e["seq"] for e in listener.of(name)]


async def publish(app, user_id: str, count: int, start: int = 0) -> None:
    """Publish `count` stored events of the user, as the task service would."""
    for i in range(start, start + count):
        await publish_event(app, user_id, "task.created",
                            {"taskId": f"t{i}", "userId": user_id, "n": i})


async def resume(listen, app, user_id: str, last_seq: int):
    return await listen(app.url, auth={"token": mint(user_id), "lastSeq": last_seq})


async def test_connecting_with_last_seq_replays_what_was_missed_then_goes_live(droid, listen):
    user = str(uuid.uuid4())
    await publish(droid, user, 5)
    tab = await resume(listen, droid, user, 2)
    await tab.wait_for(lambda: seqs(tab) == [3, 4, 5])
    await publish(droid, user, 1, start=5)
    await tab.wait_for(lambda: seqs(tab) == [3, 4, 5, 6])
    assert seqs(tab, "task.created") == [3, 4, 5, 6]
    names = [name for name, _ in tab.events if name != "connections.count"]
    assert names[0] == "connected"
    # Each replayed envelope is the stored one: the specific event, then task.event.
    assert names[1:] == ["task.created", "task.event"] * 4
    assert [e["data"]["n"] for e in tab.of("task.event")] == [2, 3, 4, 5]


async def test_a_client_that_is_up_to_date_gets_nothing_replayed(droid, listen):
    user = str(uuid.uuid4())
    await publish(droid, user, 3)
    tab = await resume(listen, droid, user, 3)
    await tab.next("connected")
    await tab.client.call("ping", namespace="/events", timeout=5)
    assert tab.of("task.event") == [] and tab.of("resync") == []


@pytest.mark.parametrize("value", [-1, "abc", True, None, {"n": 1}])
async def test_a_meaningless_last_seq_is_ignored(droid, listen, value):
    user = str(uuid.uuid4())
    await publish(droid, user, 2)
    tab = await listen(droid.url, auth={"token": mint(user), "lastSeq": value})
    await tab.next("connected")
    await tab.client.call("ping", namespace="/events", timeout=5)
    assert tab.of("task.event") == []
    await publish(droid, user, 1, start=2)
    await tab.wait_for(lambda: seqs(tab) == [3])


async def test_subscribe_with_last_seq_fills_the_gap_of_an_unsubscribed_tab(droid, listen):
    user = str(uuid.uuid4())
    tab = await listen(droid.url, mint(user))
    await tab.next("connected")
    await publish(droid, user, 2)
    await tab.wait_for(lambda: seqs(tab) == [1, 2])
    await tab.client.call("unsubscribe.tasks", namespace="/events", timeout=5)
    await publish(droid, user, 3, start=2)  # seq 3 to 5, missed
    reply = await tab.client.call("subscribe.tasks", {"lastSeq": 2}, namespace="/events",
                                  timeout=5)
    assert reply["userId"] == user
    # The replay comes before the answer to subscribe.tasks.
    assert seqs(tab) == [1, 2, 3, 4, 5]
    await publish(droid, user, 1, start=5)
    await tab.wait_for(lambda: seqs(tab) == [1, 2, 3, 4, 5, 6])
    assert [n for n, _ in tab.events if n in ("subscribed.tasks", "task.event")][-2:] == [
        "subscribed.tasks", "task.event"]


async def test_replay_while_publishing_has_no_gap_and_no_duplicate(droid, listen):
    """Envelopes published during the handshake and the replay (over several batches) are
    held by the socket's outbox and released after it: every envelope arrives once, in order,
    whichever way they interleave."""
    user = str(uuid.uuid4())
    await publish(droid, user, 600)
    published = 600
    connecting = asyncio.Event()
    welcomed = asyncio.Event()
    during_connect = 0

    async def keep_publishing() -> None:
        nonlocal published, during_connect
        await connecting.wait()
        # publish all through the handshake and the replay (bounded: publishing no longer
        # waits for the replay, and would otherwise starve the client in this same process)
        while not welcomed.is_set() and during_connect < 300:
            await publish(droid, user, 1, start=published)
            published += 1
            during_connect += 1
            await asyncio.sleep(0)
        await publish(droid, user, 50, start=published)
        published += 50

    publisher = asyncio.get_running_loop().create_task(keep_publishing())
    connecting.set()
    tab = await resume(listen, droid, user, 0)
    await tab.wait_for(lambda: len(tab.of("task.event")) >= 600, timeout=20)
    welcomed.set()
    await publisher
    await tab.wait_for(lambda: len(tab.of("task.event")) >= published, timeout=20)
    assert during_connect > 0
    assert seqs(tab) == list(range(1, published + 1))
    assert seqs(tab, "task.created") == list(range(1, published + 1))


async def test_subscribe_replay_while_publishing_has_no_gap_and_no_duplicate(droid, listen):
    user = str(uuid.uuid4())
    tab = await listen(droid.url, mint(user))
    await tab.next("connected")
    await tab.client.call("unsubscribe.tasks", namespace="/events", timeout=5)
    await publish(droid, user, 700)
    subscribe = asyncio.get_running_loop().create_task(tab.client.call(
        "subscribe.tasks", {"lastSeq": 0}, namespace="/events", timeout=15))
    await publish(droid, user, 100, start=700)
    await subscribe
    await tab.wait_for(lambda: len(tab.of("task.event")) >= 800, timeout=20)
    assert seqs(tab) == list(range(1, 801))


async def test_resync_when_last_seq_is_older_than_what_is_kept(droid, listen):
    user = str(uuid.uuid4())
    await publish(droid, user, 10)
    await droid.store.delete_events(user, 5)

    stale = await resume(listen, droid, user, 2)
    assert await stale.next("resync") == {"oldestSeq": 6}
    fresh = await resume(listen, droid, user, 5)  # 6 is the next one: nothing is missing
    await fresh.wait_for(lambda: seqs(fresh) == [6, 7, 8, 9, 10])
    assert fresh.of("resync") == []

    await publish(droid, user, 1, start=10)
    await stale.wait_for(lambda: seqs(stale) == [11])  # live again after the resync
    await fresh.wait_for(lambda: seqs(fresh) == [6, 7, 8, 9, 10, 11])

    await stale.client.call("subscribe.tasks", {"lastSeq": 4}, namespace="/events", timeout=5)
    assert stale.of("resync") == [{"oldestSeq": 6}, {"oldestSeq": 6}]
    assert seqs(stale) == [11]


async def test_resync_when_nothing_is_kept_any_more(droid, listen):
    user = str(uuid.uuid4())
    await publish(droid, user, 4)
    await droid.store.delete_events(user)
    tab = await resume(listen, droid, user, 1)
    assert await tab.next("resync") == {"oldestSeq": 5}
    await publish(droid, user, 1, start=4)
    await tab.wait_for(lambda: seqs(tab) == [5])
