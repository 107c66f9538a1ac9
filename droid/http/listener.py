"""Accepting connections: the descriptor limit, a cap on open connections, and running out.

- `raise_descriptor_limit()`: `python -m droid` raises its soft RLIMIT_NOFILE to the hard one at
  start-up (a soft limit of 1,024 is common, and every socket is a descriptor).
- `Listener`: Droid's accept loop, in place of Tornado's (`tornado.netutil.add_accept_handler`,
  which `HTTPServer.add_sockets` uses). Tornado's lets `accept()`'s EMFILE out of its IOLoop
  handler: the listening socket stays readable, so the handler runs again at once, and each run
  logs a traceback (100% CPU and ~11,000 tracebacks a second with `ulimit -n 256` and 246 idle
  WebSockets; `/health` unanswered). Here:
  - at most `max_connections` connections are open at once (DROID_MAX_CONNECTIONS; by default
    the descriptor limit less a reserve for the store, Redis, the LLM and logs). One over it is
    answered at once with a canned `503` in the error shape (`Retry-After: 1`) and closed, never
    read: cheap, and the descriptor it took comes back at once;
  - `accept()` failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
    stops accepting for a moment (50 ms, doubling up to 1 s while it lasts): connections wait in
    the kernel's backlog.
  - connections are taken a few at a time (_BATCH per wake-up of the listening socket), so that a
    storm of handshakes (every client of a proxy that restarted, reconnecting at once) does not
    fill a turn of the loop and delay the events of sockets already connected; the rest wait a
    turn in the kernel's backlog (1,024, serving.py).
  Each is logged as an episode: one WARNING when it starts, one when it has not recurred for
  10 s, with how many times it happened (at the cap, connections come and go many times a
  second: a line each time would be a flood of its own).
  Accepted connections are handed to the HTTP server through its public `handle_stream`.
- Streams of accepted connections count themselves out when their descriptor is closed, and
  drop the traceback of the error that closed them: Tornado keeps that error on the stream
  (`IOStream.error`), and its traceback's frames hold the stream, so a connection reset by its
  client stayed in a reference cycle (its handler, buffers and session with it) until a full
  garbage collection, which `python -m droid`'s tuned collector makes rare (issue 22, finding 7).
"""
from __future__ import annotations

import copy
import errno
import logging
import resource
import socket
from typing import Any

import tornado.httpserver
from tornado import gen
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from ..util import dumps
from ..web import error_body

log = logging.getLogger("droid.listener")

# accept() errors that mean "not now": out of descriptors (per process, system-wide), or memory
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PAUSE_MIN_S, _PAUSE_MAX_S = 0.05, 1.0
QUIET_S = 10.0  # an episode (refusing, running out) is over when it has not recurred this long
# connections accepted per wake-up of a listening socket. Tornado's own loop takes up to 128: at
# 10,000 idle sockets with 10% of them reconnecting every second, the p99 of the others' events
# was 79-104 ms with 128 and 12-30 ms with 8, for the same reconnects a second and connect times
# (bench/scale.py; bench/RESULTS.md, issue 21). Fewer (1-2) made connecting slower.
_BATCH = 8
RETRY_AFTER_S = 1
_BODY = dumps(error_body(503, "Too many connections"))
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\n"
           b"Content-Type: application/json; charset=utf-8\r\n"
           b"Retry-After: " + str(RETRY_AFTER_S).encode() + b"\r\n"
           b"Cache-Control: no-store\r\nConnection: close\r\n"
           b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def descriptor_limit() -> int:
    """This process's soft RLIMIT_NOFILE (2**20 when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a hard limit above what the kernel allows (nr_open)
        return soft, soft
    return soft, hard


def default_max_connections(limit: int | None = None) -> int:
    """The connection cap under a descriptor limit: the limit less a tenth of it (at least 64)
    for what is not a client connection (the store's files, Redis, the LLM, logs, pipes)."""
    limit = descriptor_limit() if limit is None else limit
    return max(1, limit - max(64, limit // 10))


class _Episode:
    """A condition that comes and goes many times a second while it lasts (refusing over the
    cap, accept() failing): `happened()` is True when it starts an episode (log it then), and
    `ended(seconds, count)` is called once it has not happened for QUIET_S."""

    __slots__ = ("io_loop", "ended", "started", "last", "count", "timer")

    def __init__(self, io_loop: IOLoop, ended: Any) -> None:
        self.io_loop, self.ended = io_loop, ended
        self.started = self.last = 0.0
        self.count = 0
        self.timer: Any = None

    @property
    def active(self) -> bool:
        return self.count > 0

    def happened(self) -> bool:
        now = self.io_loop.time()
        first = self.count == 0
        if first:
            self.started = now
        self.last = now
        self.count += 1
        if self.timer is None:
            self.timer = self.io_loop.call_later(QUIET_S, self._check)
        return first

    def _check(self) -> None:
        now = self.io_loop.time()
        if now - self.last < QUIET_S:
            self.timer = self.io_loop.call_later(self.last + QUIET_S - now, self._check)
            return
        self.timer = None
        count, self.count = self.count, 0
        self.ended(self.last - self.started, count)

    def cancel(self) -> None:
        if self.timer is not None:
            self.io_loop.remove_timeout(self.timer)
            self.timer = None


class Listener:
    """Accepts connections on listening sockets for `server` (see the module docstring)."""

    def __init__(self, server: tornado.httpserver.HTTPServer, max_connections: int) -> None:
        self.server = server
        self.max_connections = max_connections
        self.open = 0             # connections whose descriptor is open
        self.refused = 0          # refused over the cap, since start
        self._sockets: dict[int, socket.socket] = {}
        self._refusing: _Episode | None = None
        self._exhausted: _Episode | None = None
        self._exhausted_by = ""
        self._pause_s = _PAUSE_MIN_S
        self._resume: Any = None
        self._io_loop: IOLoop | None = None
        self._listening = False   # the accept handlers are registered
        self._stopped = False
        # the streams' class, bound to this listener (no attribute per stream)
        self.stream_class = type("CountedStream", (_CountedStream,), {"listener": self})

    def add_sockets(self, sockets: list[socket.socket]) -> None:
        self._io_loop = IOLoop.current()
        self._refusing = _Episode(self._io_loop, self._refusing_over)
        self._exhausted = _Episode(self._io_loop, self._exhausted_over)
        for sock in sockets:
            sock.setblocking(False)
            self._sockets[sock.fileno()] = sock
        self._listen(True)

    def _listen(self, on: bool) -> None:
        if on == self._listening:
            return
        self._listening = on
        for sock in self._sockets.values():
            if on:
                self._io_loop.add_handler(sock, self._accept, IOLoop.READ)
            else:
                self._io_loop.remove_handler(sock)

    def stop(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        if self._stopped:
            return
        self._stopped = True
        if self._resume is not None:
            self._io_loop.remove_timeout(self._resume)
            self._resume = None
        self._listen(False)
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        for episode in (self._refusing, self._exhausted):
            if episode is not None:
                episode.cancel()

    # accepting

    def _accept(self, sock: socket.socket, events: int) -> None:
        for _ in range(_BATCH):
            try:
                conn, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:  # closed by its client while in the backlog
                continue
            except OSError as exc:
                self._pause(exc)
                return
            if self.open >= self.max_connections:
                self._refuse(conn)
                continue
            self._serve(conn, address)

    def _serve(self, conn: socket.socket, address: Any) -> None:
        server = self.server
        try:
            stream = self.stream_class(conn, max_buffer_size=server.max_buffer_size,
                                       read_chunk_size=server.read_chunk_size)
        except Exception:
            conn.close()
            log.exception("could not set up an accepted connection")
            return
        self.open += 1
        future = server.handle_stream(stream, address)
        if future is not None:
            IOLoop.current().add_future(gen.convert_yielded(future), lambda f: f.result())

    def _refuse(self, conn: socket.socket) -> None:
        self.refused += 1
        if self._refusing.happened():
            log.warning("refusing connections: %d open (the cap, DROID_MAX_CONNECTIONS)",
                        self.open)
        try:
            conn.send(REFUSAL, socket.MSG_DONTWAIT)
        except OSError:
            pass  # gone already, or no room: the close says the same
        conn.close()

    def _refusing_over(self, seconds: float, count: int) -> None:
        log.warning("no connection refused over the cap for %g s (%d refused in %.1f s)",
                    QUIET_S, count, seconds)

    def _closed(self) -> None:
        """A counted connection's descriptor was closed."""
        self.open -= 1

    # running out

    def _pause(self, exc: OSError) -> None:
        if exc.errno not in _EXHAUSTED:
            log.debug("accept() failed", exc_info=True)
        if self._exhausted.happened():
            self._exhausted_by = f"{errno.errorcode.get(exc.errno or 0, exc.errno)} " \
                                 f"({exc.strerror})"
            self._pause_s = _PAUSE_MIN_S
            log.warning("cannot accept connections: %s, with %d open and a limit of %d "
                        "descriptors; pausing accepts until it passes", self._exhausted_by,
                        self.open, descriptor_limit())
        else:
            self._pause_s = min(_PAUSE_MAX_S, self._pause_s * 2)
        if self._resume is not None:
            return
        self._listen(False)
        self._resume = self._io_loop.call_later(self._pause_s, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._stopped:
            self._listen(True)

    def _exhausted_over(self, seconds: float, count: int) -> None:
        log.warning("accepting connections again: no %s for %g s (%d pauses in %.1f s)",
                    self._exhausted_by, QUIET_S, count, seconds)


class _CountedStream(IOStream):
    """An accepted connection's stream: counted out of its listener when its descriptor is
    closed, and keeping no traceback of the error that closed it."""

    listener: Listener
    handed_over = False

    def hand_over(self) -> Any:
        """The socket leaves this stream (a WebSocket, droid/realtime/websocket.py): whoever
        takes it calls what this returns when it closes the descriptor."""
        self.handed_over = True
        return self.listener._closed

    def close_fd(self) -> None:
        error = self.error
        if error is not None and error.__traceback__ is not None:
            self.error = _without_traceback(error)
        try:
            super().close_fd()
        finally:
            if not self.handed_over:
                self.listener._closed()


def _without_traceback(error: BaseException) -> BaseException:
    """A copy of `error` without its traceback, or `error` itself stripped of it (the original
    may still be propagating: a copy leaves its traceback to the code that handles it)."""
    try:
        clone = copy.copy(error)
    except Exception:
        return error.with_traceback(None)
    clone.__traceback__ = None
    return clone
