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
    the kernel's backlog. One WARNING when it starts, one line when accepting works again.
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
# connections accepted per wake-up (Tornado's own batch), so that others get the loop too
_BATCH = 128
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


class _Exhaustion:
    """One episode of failing accept()s: logged when it starts and when it ends."""

    __slots__ = ("started", "pauses", "delay", "reason")

    def __init__(self, now: float, reason: str) -> None:
        self.started, self.pauses, self.delay, self.reason = now, 0, _PAUSE_MIN_S, reason


class Listener:
    """Accepts connections on listening sockets for `server` (see the module docstring)."""

    def __init__(self, server: tornado.httpserver.HTTPServer, max_connections: int) -> None:
        self.server = server
        self.max_connections = max_connections
        self.open = 0             # connections whose descriptor is open
        self.refused = 0          # refused over the cap, since start
        self._refusing = 0        # refused in the current episode (0: not refusing)
        self._sockets: dict[int, socket.socket] = {}
        self._paused: _Exhaustion | None = None
        self._resume: Any = None
        self._io_loop: IOLoop | None = None
        self._listening = False   # the accept handlers are registered
        self._stopped = False
        # the streams' class, bound to this listener (no attribute per stream)
        self.stream_class = type("CountedStream", (_CountedStream,), {"listener": self})

    def add_sockets(self, sockets: list[socket.socket]) -> None:
        self._io_loop = IOLoop.current()
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
            if self._paused is not None:
                self._paused_over()
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
        if not self._refusing:
            log.warning("refusing connections: %d open (the cap, DROID_MAX_CONNECTIONS)",
                        self.open)
        self._refusing += 1
        try:
            conn.send(REFUSAL, socket.MSG_DONTWAIT)
        except OSError:
            pass  # gone already, or no room: the close says the same
        conn.close()

    def _closed(self) -> None:
        """A counted connection's descriptor was closed."""
        self.open -= 1
        if self._refusing and self.open < self.max_connections:
            log.warning("accepting connections again (%d refused over the cap)", self._refusing)
            self._refusing = 0

    # running out

    def _pause(self, exc: OSError) -> None:
        if exc.errno not in _EXHAUSTED:
            log.debug("accept() failed", exc_info=True)
        now = self._io_loop.time()
        episode = self._paused
        if episode is None:
            reason = f"{errno.errorcode.get(exc.errno or 0, exc.errno)} ({exc.strerror})"
            episode = self._paused = _Exhaustion(now, reason)
            log.warning("cannot accept connections: %s, with %d open and a limit of %d "
                        "descriptors; pausing accepts until it passes", reason, self.open,
                        descriptor_limit())
        else:
            episode.delay = min(_PAUSE_MAX_S, episode.delay * 2)
        episode.pauses += 1
        if self._resume is not None:
            return
        self._listen(False)
        self._resume = self._io_loop.call_later(episode.delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._stopped:
            self._listen(True)

    def _paused_over(self) -> None:
        episode, self._paused = self._paused, None
        log.warning("accepting connections again after %.1f s of %s (%d pauses)",
                    self._io_loop.time() - episode.started, episode.reason, episode.pauses)


class _CountedStream(IOStream):
    """An accepted connection's stream: counted out of its listener when its descriptor is
    closed, and keeping no traceback of the error that closed it."""

    listener: Listener

    def close_fd(self) -> None:
        error = self.error
        if error is not None and error.__traceback__ is not None:
            self.error = _without_traceback(error)
        try:
            super().close_fd()
        finally:
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
