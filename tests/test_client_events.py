"""droid.client's event streams against real `python -m droid` processes: `events()` keeps every
seq exactly once and in order across a SIGKILL and restart of the server (same data folder, same
port) and across connections reset by the network (a TCP proxy), says `Resync` when history has
expired; `tasks.wait` / `tasks.stream` on a task that fails and on one cancelled meanwhile (a
real fake LLM, tests/fake_llm.py), and their timeout."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
from typing import Any

import pytest
import pytest_asyncio

from conftest import TEST_SECRET
from droid.client import AsyncClient, Client, Resync, WaitTimeout
from droid.store.sqlite import SqliteStore
from droid_process import DroidProcess, spawn  # noqa: F401  (fixture)
from tcp_proxy import TcpProxy
from tests.fake_llm import FakeLLM, split_answer

pytestmark = pytest.mark.asyncio

PASSWORD = "correct horse"
ENV = {"JWT_SECRET": TEST_SECRET, "DROID_ENV": "test", "DROID_DEMO_DELAY_S": "0.05",
       "DROID_RETRY_BACKOFF_S": "0.05"}


def register(url: str) -> dict:
    with Client(url) as anonymous:
        reply = anonymous.auth.register(f"u-{uuid.uuid4().hex[:10]}@example.com", PASSWORD)
    return {**reply["user"], "token": reply["accessToken"]}


def create_and_finish(url: str, token: str, count: int) -> int:
    """Create `count` tasks, wait until each has finished; the user's last seq then."""
    with Client(url, token=token) as client:
        ids = [client.tasks.create(f"task {i}")["id"] for i in range(count)]
        for task_id in ids:
            client.tasks.wait(task_id, timeout=30)
        return client.last_seq()


class Consumer:
    """`Client.events()` in a thread, recording every seq, until it has one >= `stop_at`."""

    def __init__(self, url: str, token: str, after: int = 0) -> None:
        self.url, self.token, self.after = url, token, after
        self.seqs: list[int] = []
        self.resyncs: list[Resync] = []
        self.reconnects: list[str] = []
        self.stop_at: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "Consumer":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with Client(self.url, token=self.token) as client:
                for item in client.events(self.after, on_reconnect=self._reconnecting):
                    if isinstance(item, Resync):
                        self.resyncs.append(item)
                        continue
                    self.seqs.append(item["seq"])
                    if self.stop_at is not None and item["seq"] >= self.stop_at:
                        return
        except BaseException as exc:  # shown by the test
            self.error = exc

    def _reconnecting(self, error: Any, delay: float) -> None:
        self.reconnects.append(f"{error} ({delay:.2f} s)")

    async def until(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.error is None, repr(self.error)
            assert time.monotonic() < deadline, (self.seqs, self.reconnects)
            await asyncio.sleep(0.02)


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_events_resume_across_a_sigkill_and_a_restart(spawn, tmp_path):
    """The server is SIGKILLed with tasks in flight and started again on the same port and data
    folder: the client reconnects by itself and has every seq once, in order."""
    work = tmp_path / "work"
    first = await spawn("first", work, DROID_LEASE_S="1", **ENV).ready()
    user = await asyncio.to_thread(register, first.url)
    consumer = Consumer(first.url, user["token"]).start()
    before = await asyncio.to_thread(create_and_finish, first.url, user["token"], 4)
    await consumer.until(lambda: consumer.seqs and consumer.seqs[-1] >= before)
    # Tasks created just before the kill: their attempts die with the process.
    with Client(first.url, token=user["token"]) as client:
        in_flight = [client.tasks.create(f"in flight {i}")["id"] for i in range(3)]
    first.kill()
    await consumer.until(lambda: consumer.reconnects)
    second = await spawn("second", work, port=first.port, DROID_LEASE_S="1", **ENV).ready()
    with Client(second.url, token=user["token"]) as client:
        for task_id in in_flight:  # taken up again once their lease ran out
            await asyncio.to_thread(client.tasks.wait, task_id, timeout=30)
    last = await asyncio.to_thread(create_and_finish, second.url, user["token"], 4)
    consumer.stop_at = last
    await asyncio.to_thread(create_and_finish, second.url, user["token"], 1)  # wakes it up
    await asyncio.to_thread(consumer.thread.join, 30)
    assert not consumer.thread.is_alive() and consumer.error is None, consumer.error
    assert consumer.seqs == list(range(1, len(consumer.seqs) + 1)), consumer.seqs
    assert consumer.seqs[-1] >= last > before and consumer.resyncs == []
    assert any("cannot reach" in r or "ended" in r for r in consumer.reconnects), \
        consumer.reconnects


async def test_events_resume_across_dropped_connections(spawn):
    """Connections reset by the network (a TCP proxy cuts them) while envelopes are being
    published: AsyncClient.events() reconnects and hands over every seq once, in order."""
    droid = await spawn("droid", WORKER_CONCURRENCY="0", **ENV).ready()
    proxy = await TcpProxy(droid.port).start()
    user = await asyncio.to_thread(register, droid.url)
    seqs: list[int] = []
    reconnects: list[str] = []
    publisher = AsyncClient(droid.url, token=user["token"])
    total = 60  # 5 rounds of 12

    async def consume() -> None:
        async with AsyncClient(proxy.url, token=user["token"]) as client:
            async for item in client.events(0, on_reconnect=lambda e, d: reconnects.append(
                    str(e))):
                assert not isinstance(item, Resync)
                seqs.append(item["seq"])
                if item["seq"] >= total:
                    return

    consumer = asyncio.ensure_future(consume())
    try:
        cuts = 0
        for round_ in range(5):
            # The stream is open (the client came back after the previous cut): publish, and
            # cut while the envelopes are on their way.
            await wait_for(lambda: proxy.accepted > round_ and len(seqs) >= round_ * 12)
            for i in range(12):
                await publisher.tasks.create(f"t{round_}.{i}")  # one task.created each
            cuts += proxy.cut()
        await asyncio.wait_for(consumer, 30)
    finally:
        consumer.cancel()
        await publisher.aclose()
        await proxy.stop()
    assert seqs == list(range(1, total + 1)), seqs
    # Each cut reset the open stream; the last may come after the consumer had everything.
    assert cuts == 5 and len(reconnects) >= 4 and proxy.accepted >= 5, (cuts, reconnects)
    gc.collect()  # a stream the proxy left open would warn here, in this test


async def test_events_say_resync_then_go_on_from_get_events(spawn, tmp_path):
    """Envelopes 1 to 68 have expired (deleted from the store as expiry does; more than could
    be in flight, so the server says so at once): events(after=1) yields Resync, then what is
    kept, then live envelopes."""
    droid = await spawn("droid", WORKER_CONCURRENCY="0", **ENV).ready()
    user = await asyncio.to_thread(register, droid.url)
    async with AsyncClient(droid.url, token=user["token"]) as client:
        for i in range(70):
            await client.tasks.create(f"t{i}")
        store = SqliteStore(str(tmp_path / "work" / "droid-data" / "droid.sqlite3"))
        await store.open()
        await store.delete_events(user["id"], 68)
        await store.close()
        items: list[Any] = []
        async for item in client.events(after=1):
            items.append(item)
            if len(items) == 3:
                await client.tasks.create("live")
            if len(items) == 4:
                break
    assert items[0] == Resync(after=1, oldest_seq=69)
    assert [e["seq"] for e in items[1:]] == [69, 70, 71]
    assert "GET /events?after=1&limit=1000 " in droid.output()  # what is kept, over REST
    assert items[-1]["event"] == "task.created" and items[-1]["data"]["prompt"] == "live"


@pytest_asyncio.fixture
async def fake():
    server = FakeLLM(chunk_delay_s=0.01)
    await server.start()
    yield server
    await server.stop()


async def llm_droid(spawn, fake: FakeLLM) -> DroidProcess:
    return await spawn("droid", LLM_BASE_URL=fake.base_url, LLM_MODEL="fake-model",
                       TASK_MAX_RETRIES="0", **ENV).ready()


async def test_wait_and_stream_on_a_task_that_fails(spawn, fake):
    """The LLM sends a first piece, then drops the connection: the attempt fails and, with no
    retries left, the task fails. stream() yields the piece, then the failed task; wait()
    returns the failed task (the sync client, in a thread, at the same time)."""
    droid = await llm_droid(spawn, fake)
    user = await asyncio.to_thread(register, droid.url)
    fake.script("stream_cut")
    async with AsyncClient(droid.url, token=user["token"]) as client:
        after = await client.last_seq()
        task = await client.tasks.create("this will fail")

        def wait() -> dict:
            with Client(droid.url, token=user["token"]) as sync:
                return sync.tasks.wait(task["id"], after=after, timeout=30)

        waited = asyncio.ensure_future(asyncio.to_thread(wait))
        items = [item async for item in client.tasks.stream(task["id"], after=after,
                                                            timeout=30)]
        failed = await asyncio.wait_for(waited, 30)
    assert items[:-1] == split_answer(fake.answer)[:1], items
    assert items[-1]["status"] == "failed" and items[-1]["error"]
    assert failed == items[-1]


async def test_wait_and_stream_on_a_task_cancelled_meanwhile(spawn, fake):
    """The LLM sends a first piece and hangs; the task is cancelled from elsewhere: stream()
    yields the piece then the cancelled task, a wait() started before returns it too."""
    droid = await llm_droid(spawn, fake)
    user = await asyncio.to_thread(register, droid.url)
    fake.script("stream_hang")
    async with AsyncClient(droid.url, token=user["token"]) as client:
        after = await client.last_seq()
        task = await client.tasks.create("this will be cancelled")
        waited = asyncio.ensure_future(client.tasks.wait(task["id"], after=after, timeout=30))
        stream = client.tasks.stream(task["id"], after=after, timeout=30)
        first = await stream.__anext__()
        assert first == split_answer(fake.answer)[0]

        def cancel() -> dict:
            with Client(droid.url, token=user["token"]) as other:
                return other.tasks.cancel(task["id"])

        assert (await asyncio.to_thread(cancel))["status"] == "cancelled"
        rest = [item async for item in stream]
        assert [r["status"] for r in rest] == ["cancelled"], rest
        assert (await asyncio.wait_for(waited, 30))["status"] == "cancelled"


async def test_wait_gives_up_at_its_timeout(spawn, fake):
    droid = await llm_droid(spawn, fake)
    user = await asyncio.to_thread(register, droid.url)
    fake.script("hang")
    with Client(droid.url, token=user["token"]) as client:
        task = client.tasks.create("never answered")

        def wait() -> float:
            started = time.monotonic()
            with pytest.raises(WaitTimeout) as timed_out:
                client.tasks.wait(task["id"], timeout=1.5)
            assert timed_out.value.task_id == task["id"]
            return time.monotonic() - started

        elapsed = await asyncio.to_thread(wait)
        assert 1.4 <= elapsed < 8, elapsed  # ends near its deadline (a loaded machine aside)
        assert client.tasks.get(task["id"])["status"] == "processing"
        client.tasks.cancel(task["id"])
