"""droid/realtime/adapter.py: every private name of Tornado, python-engineio and python-socketio
that Droid uses, checked on its own (it exists, takes the parameters Droid passes) and where Droid
relies on it being called. Each test is named after its hook, and each failure says which hook
broke and what Droid loses with it: run this first after upgrading one of the three libraries
(setup.cfg's upper bounds are the releases it has passed on)."""
from __future__ import annotations

import asyncio
import inspect
import socket
import uuid

import engineio
import pytest
import socketio
import tornado.iostream
from engineio import async_socket

from droid.realtime import adapter
from droid.realtime.engine import TransportServer
from droid.realtime.websocket import WebSocket

from conftest import wait_until
from rawsio import RawSocket
from test_events import mint


def hook(name: str, ok: bool, loses: str) -> None:
    assert ok, f"hook {name} changed upstream: {loses}"


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


async def _async(value):
    return value


# Tornado ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_hook_IOStream_take_socket():
    """adapter.take_socket: after the handshake, the socket leaves Tornado's IOStream with the
    bytes the stream read past the request, and the stream no longer reads from it."""
    a, b = socket.socketpair()
    stream = tornado.iostream.IOStream(a)
    for name in ("_read_buffer", "_read_buffer_size", "_state", "socket"):
        hook(f"IOStream.{name}", hasattr(stream, name),
             "a WebSocket cannot be taken from Tornado after its handshake")
    b.sendall(b"GET / HTTP/1.1\r\n\r\n\x81\x85early")
    head = await stream.read_until(b"\r\n\r\n")
    await wait_until(lambda: _async(stream._read_buffer_size >= 7), 5)
    taken = adapter.take_socket(stream)
    hook("IOStream._read_buffer", taken is not None and taken[1] == b"\x81\x85early",
         f"the bytes read past the request are lost: {taken and taken[1]!r}")
    sock, _ = taken
    hook("IOStream._state", stream._state is None and stream.socket is None,
         "the stream still holds the socket or its event-loop registration")
    heard = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_reader(sock.fileno(), lambda: heard.done() or
                                          heard.set_result(sock.recv(100)))
    b.sendall(b"later")
    hook("IOStream._state", await asyncio.wait_for(heard, 5) == b"later",
         "the stream still reads from the socket")
    asyncio.get_running_loop().remove_reader(sock.fileno())
    assert head.startswith(b"GET")
    sock.close()
    b.close()


def test_hook_tornado_speedups_websocket_mask():
    """adapter.unmask: Tornado's C unmasking (a pure-Python fallback is used without it)."""
    hook("tornado.speedups.websocket_mask", adapter._mask is not None,
         "client frames are unmasked in pure Python (slower)")
    mask, data = b"\x01\x02\x03\x04", bytes(range(256)) * 3
    expected = bytes(d ^ mask[i % 4] for i, d in enumerate(data))
    hook("tornado.speedups.websocket_mask", adapter.unmask(mask, data) == expected,
         "it no longer unmasks as RFC 6455 5.3 says")


# python-engineio -------------------------------------------------------------------------------

def test_hook_AsyncServer_async_driver_table():
    """The driver table: `websocket` is what a session calls to serve a WebSocket (Droid's
    transport attaches there); `translate_request` builds each request's environ."""
    eio = engineio.AsyncServer(async_mode="tornado")
    table = getattr(eio, "_async", None)
    hook("AsyncServer._async", isinstance(table, dict), "no driver table to plug the transport in")
    for entry in ("websocket", "translate_request"):
        hook(f"AsyncServer._async[{entry!r}]", entry in table,
             "Droid's transport or environ builder is never called")
    upgrade = inspect.getsource(async_socket.AsyncSocket._upgrade_websocket)
    hook("AsyncServer._async['websocket']",
         "_async['websocket'](" in upgrade and "self._websocket_handler" in upgrade,
         "sessions no longer open WebSockets through the driver's entry")


def test_hook_AsyncSocket_send_ping():
    """The one task python-engineio starts per session: the ping wheel takes its place."""
    hook("AsyncSocket._send_ping", adapter.PING_TASK is not None
         and inspect.iscoroutinefunction(adapter.PING_TASK),
         "every session goes back to a sleeping ping task of its own (memory per socket)")
    hook("AsyncSocket._send_ping", params(adapter.PING_TASK) == ["self"],
         "the ping task takes other parameters")
    schedule = inspect.getsource(async_socket.AsyncSocket.schedule_ping)
    hook("AsyncSocket._send_ping", "start_background_task(self._send_ping)" in schedule,
         "schedule_ping no longer starts it through start_background_task")


@pytest.mark.asyncio
async def test_the_hooks_are_called_where_droid_relies_on_them(droid):
    """On a real server and socket: the driver's `websocket` entry attached Droid's transport,
    the ping task went to the wheel (no task of python-engineio's), `translate_request` built
    the environ, and python-socketio's connect hooks ran."""
    user = str(uuid.uuid4())
    raw = await RawSocket(droid.url).open({"token": mint(user)})
    try:
        await raw.wait_for(lambda: raw.of("connected"))
        eio = droid.sio.eio
        hook("AsyncSocket._engineio_server_class", isinstance(eio, TransportServer),
             "python-socketio built its own engine server, without Droid's transport")
        (session,) = eio.sockets.values()
        transport = eio.transport(session.sid)
        hook("AsyncServer._async['websocket']", transport is not None,
             "the WebSocket was not handed to Droid's transport")
        hook("RequestHandler.detach", isinstance(transport.ws, WebSocket),
             "the socket was not taken from Tornado after the handshake")
        wheel = [ref() for bucket in eio.wheel.buckets.values() for ref, _ in bucket]
        hook("AsyncSocket._send_ping", session in wheel,
             "the session's ping was not handed to the ping wheel")
        names = [getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()]
        hook("AsyncSocket._send_ping", not any("_send_ping" in n for n in names),
             "a ping task runs per session")
        environ = droid.sio.environ[session.sid]
        hook("AsyncServer._async['translate_request']", environ.get("REMOTE_ADDR") == "127.0.0.1"
             and "tornado.handler" not in environ and "wsgi.input" not in environ,
             "the environ was not built by Droid's translate_request, or not trimmed after the "
             "handshake")
        hook("AsyncServer._handle_eio_connect", session.queue.session is session,
             "on_session did not run for a new session (its queue cannot shed it)")
        for name in ("connected", "upgrading", "upgraded", "closing", "closed", "last_ping",
                     "queue", "sid", "schedule_ping", "receive", "send", "close"):
            hook(f"AsyncSocket.{name}", hasattr(session, name), "a session attribute is gone")
        for name in ("sockets", "ping_interval", "ping_timeout", "reason"):
            hook(f"AsyncServer.{name}", hasattr(eio, name), "an engine server attribute is gone")
        manager = droid.sio.manager
        for name in ("eio_sid_from_sid", "sid_from_eio_sid", "is_connected", "rooms",
                     "pending_connect", "pending_disconnect", "callbacks", "basic_enter_room",
                     "basic_leave_room", "basic_disconnect", "get_rooms"):
            hook(f"BaseManager.{name}", hasattr(manager, name),
                 "a manager attribute droid/realtime/rooms.py indexes is gone")
        queue = session.queue
    finally:
        await raw.close()
    try:
        await wait_until(lambda: _async(queue.session is None and not eio.sockets), 5)
    except AssertionError:
        hook("AsyncServer._handle_eio_disconnect", False,
             "an ended session was not let go of (on_session_end did not run)")


# python-socketio -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("_engineio_server_class", ["self"]),
    ("_handle_connect", ["self", "eio_sid", "namespace", "data"]),
    ("_handle_eio_connect", ["self", "eio_sid", "environ"]),
    ("_handle_eio_message", ["self", "eio_sid", "data"]),
    ("_handle_eio_disconnect", ["self", "eio_sid", "reason"]),
])
def test_hook_AsyncServer(name, expected):
    method = getattr(socketio.AsyncServer, name, None)
    hook(f"AsyncServer.{name}", method is not None, "python-socketio no longer calls it")
    hook(f"AsyncServer.{name}", params(method) == expected,
         f"its parameters are now {params(method)}, Droid passes {expected}")


def test_hook_AsyncServer_calls():
    """Where python-socketio calls the hooks Droid overrides."""
    base = inspect.getsource(socketio.base_server.BaseServer.__init__)
    hook("AsyncServer._engineio_server_class", "self._engineio_server_class()" in base,
         "the engine server is no longer built through it")
    eio_message = inspect.getsource(socketio.AsyncServer._handle_eio_message)
    hook("AsyncServer._handle_connect", "self._handle_connect(" in eio_message,
         "CONNECT packets no longer go through it (`connected` would wait a task)")
    hook("AsyncServer._handle_eio_message",
         "self.eio.on('message', self._handle_eio_message)" in base,
         "packets no longer enter through it: malformed ones reach python-socketio")
    hook("AsyncServer._handle_eio_connect",
         "self.eio.on('connect', self._handle_eio_connect)" in base,
         "new sessions are not seen: no connect deadline, no shedding of unjoined sessions")
    hook("AsyncServer._handle_eio_disconnect",
         "self.eio.on('disconnect', self._handle_eio_disconnect)" in base,
         "ended sessions are not seen: what Droid holds of them stays (sessions.py)")


@pytest.mark.asyncio
async def test_malformed_packets_are_refused_through_handle_eio_message(droid, caplog):
    """AsyncServer._handle_eio_message is where Droid refuses what python-socketio cannot take."""
    raw = await RawSocket(droid.url).open({"token": mint(str(uuid.uuid4()))})
    try:
        await raw.wait_for(lambda: raw.of("connected"))
        await raw.ws.send('42/events,{"not": "an event name"}')
        await asyncio.wait_for(raw.closed.wait(), 5)
    finally:
        await raw.close()
    hook("AsyncServer._handle_eio_message",
         any("malformed packet" in r.getMessage() for r in caplog.records),
         "the malformed EVENT was not refused by GuardedServer.on_packet")


@pytest.mark.parametrize("name, expected", [("_publish", ["self", "data"]),
                                            ("_listen", ["self"])])
def test_hook_AsyncRedisManager(name, expected):
    method = getattr(socketio.AsyncRedisManager, name, None)
    hook(f"AsyncRedisManager.{name}", method is not None,
         "Droid's Redis side (outages, one client) is bypassed")
    hook(f"AsyncRedisManager.{name}", params(method) == expected,
         f"its parameters are now {params(method)}")


@pytest.mark.asyncio
async def test_the_redis_hooks_are_called():
    """AsyncPubSubManager publishes through `_publish` and listens through `_listen`."""
    published, listened = [], []

    class Spy(adapter.RedisManagerBase):
        async def publish_raw(self, data):
            published.append(data)

        async def listen_raw(self):
            listened.append(True)
            return
            yield  # an async generator that ends at once

    manager = Spy("redis://127.0.0.1:1")
    manager.set_server(socketio.AsyncServer(async_mode="tornado", client_manager=manager))
    await manager.emit("e", {"x": 1}, namespace="/events", room="r")
    hook("AsyncRedisManager._publish", published and published[0]["event"] == "e",
         "emits are no longer published through it")
    thread = asyncio.ensure_future(manager._thread())
    await wait_until(lambda: _async(listened), 5)
    thread.cancel()
    hook("AsyncRedisManager._listen", listened, "the listener no longer reads through it")


# Nothing outside the adapter -------------------------------------------------------------------

LIBRARIES = ("tornado", "engineio", "socketio")
# private names a public API of theirs sets on Droid's classes
SET_BY_PUBLIC_API = {"_stream_request_body": "@tornado.web.stream_request_body"}


def _private_names_of_the_libraries() -> set[str]:
    """Every `_name` the three libraries define: functions, classes, methods, attributes set on
    self or cls."""
    import ast
    import importlib
    import pathlib
    names: set[str] = set()
    for lib in LIBRARIES:
        for path in pathlib.Path(importlib.import_module(lib).__file__).parent.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_name_of_the_libraries_is_used_outside_the_adapter():
    """A search of droid/ for the private names of Tornado, python-engineio and python-socketio
    finds them in droid/realtime/adapter.py only: no `obj._name` of theirs read or written
    elsewhere, no `from tornado... import _name`, and no class of Droid's that overrides a
    private method or attribute of a library class it extends."""
    import ast
    import importlib
    import pathlib
    import pkgutil

    import droid
    theirs = _private_names_of_the_libraries()
    root = pathlib.Path(droid.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == pathlib.Path(adapter.__file__):
            continue
        tree = ast.parse(path.read_text())
        # Droid's own private names (its classes keep their own `self._x`)
        ours = {n.name for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        ours |= {n.attr for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                 and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in theirs and node.attr not in ours
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: .{node.attr}")
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in LIBRARIES):
                found += [f"{path.relative_to(root.parent)}:{node.lineno}: import {a.name}"
                          for a in node.names if a.name.startswith("_")]
    # classes of Droid's built on the libraries' classes: no private name of a library base
    for info in pkgutil.walk_packages(droid.__path__, "droid."):
        if info.name in ("droid.__main__", adapter.__name__):
            continue
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not (isinstance(cls, type) and cls.__module__ == module.__name__):
                continue
            bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]
            for name in vars(cls):
                if name.startswith("_") and not name.startswith("__") \
                        and name not in SET_BY_PUBLIC_API and any(
                        name in vars(b) for b in bases):
                    found.append(f"{info.name}.{cls.__qualname__}.{name} overrides "
                                 f"a private name of {bases[0].__qualname__}")
    assert not found, "private names of the libraries outside droid/realtime/adapter.py:\n" + \
        "\n".join(found)
