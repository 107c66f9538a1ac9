"""python-socketio's room bookkeeping, indexed both ways, so that a connect and a disconnect cost
the same whether ten sockets are connected or ten thousand.

The upstream cause (python-socketio 5.18 `BaseManager`): `rooms[namespace][room]` maps each room
to its sockets, and nothing maps a socket to its rooms. So `basic_disconnect` walks every room of
the namespace (every socket has a room of its own, and Droid adds one per user) to find the few
that hold the socket leaving, and `get_rooms` does the same; a mass disconnect of N sockets is
N x N dictionary lookups (17 s of CPU for 10,000 sockets, 76% of it there). The sockets being
connected or disconnected are kept in lists (`pending_connect`, `pending_disconnect`), searched
and removed from by value on every connect, so a connection storm is quadratic too. Node's
socket.io adapter keeps a reverse index (`sids`: socket -> rooms), and so does this.

`IndexedRooms` keeps, beside python-socketio's map, each socket's rooms and replaces
the pending lists by insertion-ordered sets with the list methods python-socketio calls on them
(`append`, `remove`, `in`, `len`); python-socketio's own methods then run unchanged, except
`basic_disconnect` and `get_rooms`, which read the index. It uses python-socketio's public but
undocumented manager attributes (listed in droid/realtime/adapter.py; tests/test_adapter.py checks
them), and is plugged in through python-socketio's public `client_manager` parameter.
"""
from __future__ import annotations

from typing import Any, Iterable

import socketio

from .adapter import RedisManagerBase


class SidSet(dict):
    """An insertion-ordered set of sids answering the list methods python-socketio uses on its
    pending lists, each in constant time."""

    __slots__ = ()

    def __init__(self, sids: Iterable[str] = ()) -> None:
        super().__init__((sid, None) for sid in sids)

    def append(self, sid: str) -> None:
        self[sid] = None

    def remove(self, sid: str) -> None:
        try:
            del self[sid]
        except KeyError:
            raise ValueError(sid) from None


class _PendingByNamespace(dict):
    """`pending_connect` / `pending_disconnect`: python-socketio stores a new list per namespace;
    each becomes a SidSet."""

    __slots__ = ()

    def __setitem__(self, namespace: Any, sids: Any) -> None:
        super().__setitem__(namespace, sids if isinstance(sids, SidSet) else SidSet(sids))


class IndexedRooms:
    """Mixin of a python-socketio client manager: the rooms of each socket, indexed.

    Every socket of a namespace is in the namespace's room `None` and in its own room (its sid);
    `extra_rooms[namespace][sid]` holds the others (with Redis, its user's `sockets:{userId}`):
    one room as itself, several as a set, none as nothing, so that an idle socket costs the
    index nothing without Redis and one dict entry with it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_rooms: dict[str, dict[str, Any]] = {}
        self.pending_connect = _PendingByNamespace()
        self.pending_disconnect = _PendingByNamespace()

    def basic_enter_room(self, sid: str, namespace: str, room: Any,
                         eio_sid: str | None = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)  # type: ignore[misc]
        if room is None or room == sid:
            return
        extra = self.extra_rooms.setdefault(namespace, {})
        have = extra.get(sid)
        if have is None:
            extra[sid] = room
        elif isinstance(have, set):
            have.add(room)
        elif have != room:
            extra[sid] = {have, room}

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)  # type: ignore[misc]
        if room is None or room == sid:
            return
        extra = self.extra_rooms.get(namespace)
        have = extra.get(sid) if extra is not None else None
        if have is None:
            return
        if isinstance(have, set):
            have.discard(room)
            if len(have) == 1:
                extra[sid] = next(iter(have))
        elif have == room:
            del extra[sid]
        if not extra:
            del self.extra_rooms[namespace]

    def _extra(self, sid: str, namespace: str) -> list:
        have = self.extra_rooms.get(namespace, {}).get(sid)
        return list(have) if isinstance(have, set) else [] if have is None else [have]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        for room in self._extra(sid, namespace) + [sid, None]:
            self.basic_leave_room(sid, namespace, room)
        # What is left of python-socketio's own basic_disconnect (its callbacks and pending
        # entries); with the rooms already left, its walk over the rooms finds none to leave,
        # so it is not called.
        self.callbacks.pop(sid, None)  # type: ignore[attr-defined]
        for pending in (self.pending_connect, self.pending_disconnect):
            sids = pending.get(namespace)
            if sids is not None and sid in sids:
                del sids[sid]
                if not sids:
                    del pending[namespace]

    def get_rooms(self, sid: str, namespace: str) -> list:
        if sid not in self.rooms.get(namespace, {}).get(sid, ()):  # type: ignore[attr-defined]
            return []
        return [sid] + self._extra(sid, namespace)


class IndexedManager(IndexedRooms, socketio.AsyncManager):
    """python-socketio's AsyncManager (one process), indexed."""


class IndexedRedisManagerBase(IndexedRooms, RedisManagerBase):
    """The base of Droid's Redis manager (droid/realtime/cluster.py), indexed."""
