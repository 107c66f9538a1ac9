"""Malformed Engine.IO / Socket.IO packets on a raw WebSocket (issue 7).

Each case sends a few hostile frames on two attack sockets: one authenticated as user B on
/events, one that never went past the Engine.IO handshake. Then:

- the server is up (`GET /health` is 200);
- user A's python-socketio client and user C's raw socket were never disconnected, still answer,
  and still receive their own task events (a real task each, run by the demo agent);
- no attack socket received anything of A's or C's, and A and C nothing of B's;
- the server logged no traceback (nothing at ERROR, nothing with exc_info, from any logger);
- each attack socket ended in a clean state: what the contract fixes is asserted exactly (a
  packet over 64 KiB closes the connection, an unknown namespace is refused with `Invalid
  namespace`, a CONNECT without a usable token with `Authentication required`); for packets the
  contract says nothing about, closing the connection (what the reference JavaScript server does
  on a parse error) and ignoring the packet are both accepted, but a half-dead socket, one that
  neither answers nor is closed, is not.

Most of these cases were findings against python-socketio 5.18.1 and python-engineio 4.15.1
(tracebacks per packet, half-dead sockets counted for a minute, unbounded attachment buffering,
a wedged socket) and one against Droid (handlers that could not take extra arguments);
droid/realtime/guard.py now refuses such traffic, and its docstring says how.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from typing import Any

import pytest
import pytest_asyncio
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import wait_until
from rawsio import RawSocket
from test_events import mint

pytestmark = pytest.mark.asyncio

SETTLE_S = 1.5   # how long an attack socket has to answer a probe or be closed
PROBE_S = 0.5    # one probe's wait before the next is sent
ALIVE, CLOSED, EITHER = "alive", "closed", "either"

# the corpus -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    frames: list[Any]                   # str: a text frame; bytes: a binary frame;
                                        # ("utf8", bytes): a text frame of raw bytes
    auth: str = EITHER                  # expected end state of the authenticated socket
    raw: str = EITHER                   # ... and of the socket that never sent CONNECT
    auth_replies: tuple[str, ...] = ()  # frames the authenticated socket must receive
    raw_replies: tuple[str, ...] = ()


def deep(n: int) -> str:
    return "[" * n + "]" * n


PING = '42/events,["ping",{}]'
NO_TOKEN = '44/events,{"message":"Authentication required","data":{"code":401}}'
BAD_TOKEN = '44/events,{"message":"Invalid token","data":{"code":401}}'
NOPE = '44/nope,{"message":"Invalid namespace"}'
ROOT = '44{"message":"Invalid namespace"}'
OVERSIZE = "42/events," + json.dumps(["ping", {"message": "x" * 70_000}])

CASES = [
    # Engine.IO
    pytest.param(Case(["9", "7"]), id="eio-type-above-6"),
    pytest.param(Case([""]), id="eio-empty-frame"),
    pytest.param(Case(["x"]), id="eio-type-not-a-digit"),
    pytest.param(Case(["bA"]), id="eio-base64-bad-padding"),
    pytest.param(Case(["bAAAA"]), id="eio-base64-binary-message"),
    pytest.param(Case(["4"]), id="eio-empty-message"),
    pytest.param(Case(["0", "0{}", "6", "6x"]), id="eio-open-and-noop-from-client"),
    pytest.param(Case(["5", "2probe", "3probe", "5"]), id="eio-upgrade-probes-out-of-state"),
    pytest.param(Case(["2"] * 1000 + ["3"] * 1000), id="eio-ping-pong-flood"),
    pytest.param(Case(["1", PING, '40/events,{}'], auth=CLOSED, raw=CLOSED),
                 id="eio-close-then-data"),
    # Socket.IO packet types and shapes
    pytest.param(Case(["47", "48/events,[]", "49"]), id="sio-type-above-6"),
    pytest.param(Case(["4x", "4-", "4/events,"]), id="sio-type-not-a-digit"),
    pytest.param(Case(['44/events,{"message":"x"}']), id="sio-connect-error-from-client"),
    pytest.param(Case(["42", "42/events,", "42/events"]), id="sio-event-without-payload"),
    pytest.param(Case(['42/events,["ping"', '42/events,["ping",{]', "42/events,[\"ping\",'a']"]),
                 id="sio-event-broken-json"),
    pytest.param(Case(['42/events,{}', '42/events,{"0":"ping"}', '42/events,1.5',
                       '42/events,null', '42/events,true']),
                 id="sio-event-payload-not-an-array"),
    pytest.param(Case(['42/events,"ping"']), id="sio-event-payload-a-string"),
    pytest.param(Case(['42/events,[]']), id="sio-event-empty-array"),
    pytest.param(Case(['42/events,["ping",{},"extra"]', '42/events,3["subscribe.tasks",{},1]',
                       '42/events,["unsubscribe.tasks",null,null]',
                       '42/events,4["auth.refresh",{"token":"x"},{}]'], auth=ALIVE),
                 id="sio-event-with-extra-arguments"),
    pytest.param(Case(['42/events,[1]', '42/events,[null]', '42/events,[true]',
                       '42/events,[-1.5,{}]', '42/events,[""]']),
                 id="sio-event-name-a-scalar"),
    pytest.param(Case(['42/events,[[]]', '42/events,[{}]', '42/events,[["ping"],{}]']),
                 id="sio-event-name-a-list-or-object"),
    pytest.param(Case(['42/events,99999999999999999999999999["ping",{}]',
                       '42/events,0["ping",{}]']),
                 id="sio-huge-ack-id"),
    pytest.param(Case(["42/events," + "9" * 120 + '["ping",{}]']), id="sio-ack-id-over-100-digits"),
    pytest.param(Case(['43/events,5[]', '43/events,7["x"]', '43/events,[]', '43/events,3']),
                 id="sio-ack-for-nothing"),
    pytest.param(Case(['451-/events,["ping",{"_placeholder":true,"num":0}]']),
                 id="sio-binary-event-attachment-never-sent"),
    pytest.param(Case(['45999999-/events,["ping",{"_placeholder":true,"num":0}]'],
                      auth=CLOSED),
                 id="sio-binary-event-attachment-count-lie"),
    pytest.param(Case(['45999999-/events,["ping",{"_placeholder":true,"num":0}]']
                      + [b"x" * 16_000] * 20, auth=CLOSED),
                 id="sio-binary-attachments-beyond-64-kib"),
    pytest.param(Case(['451-/events,["ping",{"_placeholder":true,"num":7}]', b"\x01",
                       '451-/events,["ping",{"_placeholder":true,"num":"a"}]', b"\x01"]),
                 id="sio-binary-placeholder-out-of-range"),
    pytest.param(Case(['45999999999999-/events,["ping"]']), id="sio-attachment-count-too-long"),
    # CONNECT
    pytest.param(Case(['40/nope,{}', '40/nope'], auth=ALIVE, raw=ALIVE,
                      auth_replies=(NOPE, NOPE), raw_replies=(NOPE, NOPE)),
                 id="connect-unknown-namespace"),
    pytest.param(Case(["40", "40{}"], auth=ALIVE, raw=ALIVE, auth_replies=(ROOT, ROOT),
                      raw_replies=(ROOT, ROOT)),
                 id="connect-root-namespace"),
    pytest.param(Case(['40/events,[1,2]', '40/events,"x"', '40/events,null', '40/events,true'],
                      auth=ALIVE, raw=ALIVE, raw_replies=(NO_TOKEN,) * 4),
                 id="connect-auth-not-an-object"),
    pytest.param(Case(['40/events,{"token":123}', '40/events,{"token":["a"]}',
                       '40/events,{"token":"x","lastSeq":"1e999"}',
                       '40/events,{"token":{"token":"x"}}'],
                      auth=ALIVE, raw=ALIVE, raw_replies=(NO_TOKEN, NO_TOKEN, BAD_TOKEN, NO_TOKEN)),
                 id="connect-token-of-the-wrong-type"),
    # what JSON and UTF-8 allow, and do not
    pytest.param(Case(['42/events,["ping",' + deep(10_000) + "]", "40/events," + deep(10_000)]),
                 id="json-10000-nested-arrays"),
    pytest.param(Case(['42/events,["ping",' + deep(500) + "]"]), id="json-500-nested-arrays"),
    pytest.param(Case(['42/events,["ping",{"message":"\\ud800"}]', '42/events,["\\udc00"]']),
                 id="json-lone-surrogate-escapes"),
    pytest.param(Case([("utf8", b'42/events,["ping",{"message":"\xed\xa0\x80"}]')],
                      auth=CLOSED, raw=CLOSED),
                 id="text-frame-lone-surrogate-bytes"),
    pytest.param(Case([("utf8", b'42/events,["ping",{"message":"\xff\xfe"}]')],
                      auth=CLOSED, raw=CLOSED),
                 id="text-frame-invalid-utf8"),
    pytest.param(Case([b'42/events,["ping",{}]', b"\xff\xfe\xfd", b"\xed\xa0\x80", b""]),
                 id="binary-frames-where-text-is-expected"),
    # limits
    pytest.param(Case([OVERSIZE], auth=CLOSED, raw=CLOSED), id="text-frame-over-64-kib"),
    pytest.param(Case([b"4" * 70_000], auth=CLOSED, raw=CLOSED), id="binary-frame-over-64-kib"),
    pytest.param(Case([PING] * 300, auth=ALIVE,
                      auth_replies=('42/events,["error",{"message":"Rate limit exceeded"}]',)),
                 id="sio-event-flood"),
]


# the scene ------------------------------------------------------------------------------------

def tracebacks(caplog) -> list[str]:
    """Every log record that reports an error or carries an exception, from any logger."""
    return [f"{r.name}: {r.getMessage().splitlines()[0][:80]}"
            + (f" ({r.exc_info[1]!r:.120})" if r.exc_info else "")
            for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


class Scene:
    """User A's python-socketio client and user C's raw socket, which no attack may touch, and
    user B's attack sockets."""

    def __init__(self, droid, api, caplog) -> None:
        self.droid, self.api, self.caplog = droid, api, caplog
        self.attackers: list[RawSocket] = []
        self.disconnects: list[Any] = []

    async def start(self, listen) -> "Scene":
        # Tokens as Droid issues them (registering costs an argon2 hash per user and test).
        self.a, self.c = ({"id": user, "token": mint(user)}
                          for user in (str(uuid.uuid4()), str(uuid.uuid4())))
        self.b = str(uuid.uuid4())
        self.observer = await listen(self.droid.url, self.a["token"])
        await self.observer.next("connected")
        self.observer_sid = self.observer.client.get_sid("/events")

        async def disconnected(*args: Any) -> None:
            self.disconnects.append(args)
        self.observer.client.on("disconnect", disconnected, namespace="/events")
        self.bystander = await RawSocket(self.droid.url).open({"token": self.c["token"]})
        await self.bystander.wait_for(lambda: self.bystander.of("connections.count"))
        return self

    async def attacker(self, auth: bool, user: str | None = None) -> RawSocket:
        sock = RawSocket(self.droid.url)
        self.attackers.append(sock)
        if auth:
            await sock.open({"token": mint(user or self.b)})
            await sock.wait_for(lambda: sock.of("connections.count"))
        else:
            await sock.open_engineio()
        return sock

    async def send(self, sock: RawSocket, frames: list[Any]) -> None:
        for frame in frames:
            try:
                if isinstance(frame, tuple):
                    await sock.send_text_bytes(frame[1])
                else:
                    await sock.send_raw(frame)
            except websockets.ConnectionClosed:
                return  # closed by the server midway (what the last frames were about)

    async def settle(self, sock: RawSocket, auth: bool, *, ping: bool | None = None) -> str:
        """ALIVE once the socket answers a probe; CLOSED once the server closed the WebSocket or
        sent an Engine.IO CLOSE packet (a client must close on it), and, for an authenticated
        socket, the gateway forgot it. A half-dead socket, neither, fails the test.

        The probe is a `ping` event on /events when `ping` (by default: when authenticated; it
        proves that the /events session still works), else a CONNECT to an unknown namespace,
        which any live Engine.IO session answers. A probe is sent again while unanswered: a
        rate-limited ping is dropped, and a socket that awaits binary attachments takes the
        first one as an attachment.
        """
        ping = auth if ping is None else ping
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        for n in range(1, 1000):
            mark, start = f"probe {n} {uuid.uuid4().hex[:8]}", len(sock.frames)

            def answered() -> bool:
                if ping:
                    return any(isinstance(p, dict) and p.get("message") == mark
                               for p in sock.of("pong"))
                return NOPE in sock.frames[start:]
            try:
                if "1" in sock.frames:
                    break
                if ping:
                    await sock.emit("ping", {"message": mark})
                else:
                    await sock.send_raw("40/nope,")
                await sock.wait_for(lambda: answered() or "1" in sock.frames, timeout=PROBE_S)
                if answered():
                    return ALIVE
            except (websockets.ConnectionClosed, ConnectionError):
                break
            except asyncio.TimeoutError:
                if loop.time() > deadline:
                    raise AssertionError(
                        f"{'authenticated' if auth else 'unconnected'} attack socket is "
                        f"half-dead: neither answers nor is closed after {SETTLE_S} s; "
                        f"logged: {tracebacks(self.caplog)[:3]}") from None
        if "1" not in sock.frames:
            await asyncio.wait_for(sock.closed.wait(), SETTLE_S)
        if auth:
            await wait_until(lambda: _async(sock.sid not in self.droid.gateway.sockets),
                             timeout=SETTLE_S)
        return CLOSED

    async def verify(self) -> None:
        """The server is up, A and C are untouched, nothing leaked, nothing was logged."""
        assert (await self.api.get("/health")).status == 200
        posted = await asyncio.gather(
            *(self.api.post("/tasks", {"prompt": "still there?"}, token=user["token"])
              for user in (self.a, self.c)))
        assert [r.status for r in posted] == [201, 201], [r.body for r in posted]
        task_a, task_c = (r.body["id"] for r in posted)
        for name in ("task.created", "task.completed"):
            await self.observer.next(name, where=lambda e: e["data"]["taskId"] == task_a)
            await self.bystander.wait_for(
                lambda: [e for e in self.bystander.of(name) if e["data"]["taskId"] == task_c])

        assert self.observer.client.connected and self.disconnects == []
        assert self.observer.client.get_sid("/events") == self.observer_sid
        assert await self.observer.client.call("ping", {"message": "a"}, namespace="/events",
                                               timeout=5)
        await self.bystander.emit("ping", {"message": "c"})
        await self.bystander.wait_for(lambda: [p for p in self.bystander.of("pong")
                                               if p["message"] == "c"])
        assert not self.bystander.closed.is_set()
        assert {self.observer_sid, self.bystander.sid} <= set(self.droid.gateway.sockets)
        for sock, user in ((self.observer, self.a), (self.bystander, self.c)):
            assert {c["count"] for c in sock.of("connections.count")} == {1}
            assert {e["data"]["userId"] for e in sock.of("task.event")} == {user["id"]}
        seen_by_a = json.dumps(self.observer.events) + "".join(
            f for f in self.bystander.frames if isinstance(f, str))
        assert self.b not in seen_by_a

        others = (self.a["id"], self.c["id"], task_a, task_c)
        for sock in self.attackers:
            for frame in sock.frames:
                text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                assert not any(secret in text for secret in others), text[:200]
        assert tracebacks(self.caplog) == []

    async def close(self) -> None:
        for sock in [self.bystander, *self.attackers]:
            await sock.close()


async def _async(value: Any) -> Any:
    return value


@pytest_asyncio.fixture
async def scene(droid, api, listen, caplog):
    made = await Scene(droid, api, caplog).start(listen)
    yield made
    await made.close()


# tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
async def test_a_malformed_packet_harms_no_one_else(scene, case):
    authed, raw = await scene.attacker(auth=True), await scene.attacker(auth=False)
    await asyncio.gather(scene.send(authed, case.frames), scene.send(raw, case.frames))
    for sock, auth, expected, replies in ((authed, True, case.auth, case.auth_replies),
                                          (raw, False, case.raw, case.raw_replies)):
        outcome = await scene.settle(sock, auth)
        assert expected in (EITHER, outcome), (auth, outcome)
        for reply in set(replies):
            assert sock.frames.count(reply) >= replies.count(reply), (reply, sock.frames[-10:])
    await scene.verify()


async def test_an_engineio_close_ends_the_socketio_session_at_once(scene):
    """The half of `eio-close-then-data` that holds today: the session ends at once."""
    closing, other = await scene.attacker(auth=True), await scene.attacker(auth=True)
    await other.wait_for(lambda: {"count": 2} in other.of("connections.count"))
    await closing.send_raw("1")
    await other.wait_for(lambda: other.of("connections.count")[-1] == {"count": 1})
    assert closing.sid not in scene.droid.gateway.sockets
    assert other.sid in scene.droid.gateway.sockets
    await scene.verify()


async def test_an_over_64_kib_packet_after_odd_ones_still_closes_the_socket(scene):
    sock = await scene.attacker(auth=True)
    # What the contract answers (a refusal, an unknown event that does nothing), then too much.
    await scene.send(sock, ['40/nope,{}', '42/events,["no.such.event",{}]', PING])
    assert await scene.settle(sock, auth=True) == ALIVE
    await scene.send(sock, [OVERSIZE])
    assert await scene.settle(sock, auth=True) == CLOSED
    assert sock.ws.close_code == 1009
    await scene.verify()


# random frames --------------------------------------------------------------------------------

PREFIXES = ["", "0", "1", "2", "3", "4", "5", "6", "7", "b", "40", "41", "42", "43", "44", "45",
            "46", "47", "451-", "40/events,", "41/events,", "42/events,", "43/events,1",
            "451-/events,", "42/nope,"]
JSON_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
JSON_VALUES = JSON_DATA.map(json.dumps)
TEXT_FRAMES = st.one_of(
    st.text(max_size=200),
    st.tuples(st.sampled_from(PREFIXES), st.one_of(JSON_VALUES, st.text(max_size=40)))
    .map("".join))
CLIENT_EVENTS = ["ping", "subscribe.tasks", "unsubscribe.tasks", "auth.refresh", "task.created",
                 "connected", "error", "x" * 300]
# Well-formed EVENT packets (with or without an ack id) carrying any JSON: Droid's own handlers.
# At most one argument: more is case `sio-event-with-extra-arguments` (raise it to 3 once fixed).
EVENT_FRAMES = st.tuples(
    st.sampled_from(["42/events,", "42/events,1"]),
    st.sampled_from(CLIENT_EVENTS),
    st.lists(st.one_of(JSON_DATA, st.fixed_dictionaries({}, optional={
        "message": JSON_DATA, "lastSeq": JSON_DATA, "token": JSON_DATA})), max_size=3),
).map(lambda t: t[0] + json.dumps([t[1], *t[2]]))
BINARY_FRAMES = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from(PREFIXES), JSON_VALUES).map(lambda p: "".join(p).encode()))


def examples(strategy: st.SearchStrategy, count: int = 60) -> list[Any]:
    """`count` values drawn by hypothesis, the same ones on every run (derandomized): the frames
    are sent from the running event loop, which hypothesis's own runner cannot drive."""
    drawn: list[Any] = []

    @settings(max_examples=count, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value: Any) -> None:
        drawn.append(value)

    draw()
    return drawn


async def each_on_a_fresh_socket(scene: Scene, frames: list[tuple[bool, Any]],
                                 expected: str = EITHER) -> None:
    """Each frame on a fresh socket, authenticated (as a fresh user, so that sockets the server
    has not let go of yet never reach the per-user limit) or not; stops at the first harm."""
    for auth, frame in frames:
        logged = len(tracebacks(scene.caplog))
        sock = await scene.attacker(auth=auth, user=str(uuid.uuid4()))
        await scene.send(sock, [frame])
        try:
            # A random frame may legitimately leave /events (41/events,): the neutral probe.
            outcome = await scene.settle(sock, auth, ping=expected == ALIVE)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (frame {frame!r}, authenticated: {auth})") from None
        assert expected in (EITHER, outcome), (frame, auth, outcome)
        assert tracebacks(scene.caplog)[logged:] == [], (frame, auth)
        await sock.close()
    await scene.verify()


async def test_random_text_frames_harm_no_one_else(scene):
    await each_on_a_fresh_socket(scene, examples(st.tuples(st.booleans(), TEXT_FRAMES)))


async def test_random_binary_frames_harm_no_one_else(scene):
    await each_on_a_fresh_socket(scene, examples(st.tuples(st.booleans(), BINARY_FRAMES)))


async def test_client_events_with_random_payloads_are_answered_or_ignored(scene):
    """Well-formed events of an authenticated client, with any JSON as arguments: the socket
    stays connected and answering."""
    await each_on_a_fresh_socket(scene, [(True, frame) for frame in examples(EVENT_FRAMES)],
                                 expected=ALIVE)


# the same over long-polling (issue 14) ---------------------------------------------------------

class PollingAttacker:
    """An Engine.IO long-polling session of user B, authenticated on /events."""

    def __init__(self, droid) -> None:
        from tornado.httpclient import AsyncHTTPClient
        self.droid = droid
        self.http = AsyncHTTPClient(force_instance=True)
        self.base = droid.url + "/socket.io/?EIO=4&transport=polling"
        self.sid = ""

    async def fetch(self, body: bytes | None = None, timeout: float = SETTLE_S * 4):
        from tornado.httpclient import HTTPRequest
        return await self.http.fetch(HTTPRequest(
            f"{self.base}&sid={self.sid}" if self.sid else self.base,
            method="GET" if body is None else "POST", body=body, request_timeout=timeout),
            raise_error=False)

    async def open(self, token: str) -> "PollingAttacker":
        opened = (await self.fetch()).body.decode()
        self.sid = json.loads(opened[opened.index("{"):])["sid"]
        assert (await self.fetch(b'40/events,{"token":"%s"}' % token.encode())).code == 200
        assert "40/events" in (await self.fetch()).body.decode()
        return self

    async def settle(self) -> str:
        """CLOSED when the session is over, ALIVE when it still answers a probe."""
        if self.sid not in self.droid.sio.eio.sockets:
            # (python-engineio would log a request for it at ERROR, once per process)
            return CLOSED
        reply = await self.fetch(b"40/nope,")
        if reply.code == 400:
            return CLOSED
        assert reply.code == 200, reply.code
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S * 4
        while loop.time() < deadline:
            polled = await self.fetch()
            text = polled.body.decode(errors="replace")
            if polled.code == 400 or text.startswith("1") or "\x1e1" in text:
                return CLOSED
            if NOPE in text.split("\x1e"):
                return ALIVE
        raise AssertionError("half-dead long-polling session: neither answers nor is over")

    def close(self) -> None:
        self.http.close()


POLLING_CASES = [
    pytest.param("\x1e".join(c.values[0].frames), id=c.id) for c in CASES
    if all(isinstance(f, str) for f in c.values[0].frames)
] + [
    pytest.param("4" + "x" * 70_000, id="polling-over-64-kib"),
    pytest.param('40/events,{"token":"' + "t" * 100_000 + '"}', id="polling-100-kb-auth-token"),
    pytest.param("d=" + PING, id="polling-jsonp"),
    pytest.param("\x1e" * 40, id="polling-empty-packets"),
    pytest.param(("utf8", b"4\xff\xfe"), id="polling-not-utf8"),
]


@pytest.mark.parametrize("payload", POLLING_CASES)
async def test_a_malformed_polling_payload_is_answered_and_harms_no_one_else(scene, payload):
    """Every long-polling POST is answered at once, whatever it carries (it used to hang on
    packets python-engineio refuses and on bodies over 64 KiB); the session is then either over
    or still answering, never half-dead; A and C notice nothing."""
    attacker = await PollingAttacker(scene.droid).open(mint(scene.b))
    body = payload[1] if isinstance(payload, tuple) else payload.encode()
    reply = await attacker.fetch(body, timeout=SETTLE_S * 2)
    assert reply.code in (200, 400, 413), reply.code
    if reply.code != 200:
        error = json.loads(reply.body)
        assert error["statusCode"] == reply.code and set(error) == {"statusCode", "error",
                                                                   "message"}
        assert attacker.sid not in scene.droid.sio.eio.sockets
    await attacker.settle()
    attacker.close()
    await scene.verify()
