"""A real HTTP receiver of webhooks on 127.0.0.1 for tests (and bench/webhooks.py): it records
every request (arrival time, headers, raw body) and answers as its `answer` function says."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Awaitable, Callable

import tornado.httpserver
import tornado.netutil
import tornado.web

from droid.util import loads


@dataclasses.dataclass
class Received:
    at: float               # time.time() when it arrived
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclasses.dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b"ok"
    delay_s: float = 0.0


Answer = Callable[[Received], "Reply | Awaitable[Reply]"]


class Receiver:
    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda r: Reply())
        self.received: list[Received] = []
        self.in_flight = 0
        self.max_in_flight_per_id: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._changed = asyncio.Event()
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> "Receiver":
        receiver = self

        class Handler(tornado.web.RequestHandler):
            async def post(self, *_: Any) -> None:
                got = Received(time.time(), self.request.path,
                               {k.lower(): v for k, v in self.request.headers.get_all()},
                               self.request.body)
                ident = got.headers.get("webhook-id", "")
                receiver._active[ident] = receiver._active.get(ident, 0) + 1
                receiver.max_in_flight_per_id[ident] = max(
                    receiver.max_in_flight_per_id.get(ident, 0), receiver._active[ident])
                receiver.received.append(got)
                receiver._changed.set()
                try:
                    reply = receiver.answer(got)
                    if asyncio.iscoroutine(reply):
                        reply = await reply
                    if reply.delay_s:
                        await asyncio.sleep(reply.delay_s)
                    self.set_status(reply.status)
                    for name, value in reply.headers.items():
                        self.set_header(name, value)
                    if reply.status not in (204, 304):
                        self.write(reply.body)
                finally:
                    receiver._active[ident] -= 1

            def check_xsrf_cookie(self) -> None:
                pass

        app = tornado.web.Application([(r"/.*", Handler)])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(app)
        self.server.add_sockets(sockets)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()

    def of(self, event: str | None = None) -> list[Received]:
        return [r for r in self.received if event is None or r.json.get("type") == event]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        async def loop() -> Any:
            while True:
                value = predicate()
                if value:
                    return value
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(loop(), timeout)
