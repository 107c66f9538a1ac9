"""The /events endpoint as one object: what droid.app mounts at /socket.io/, starts and stops.

It builds python-socketio's server on Droid's transport (GuardedServer, droid/realtime/guard.py),
the slow-consumer bound every session applies, ordered delivery (subscribed to the publisher),
presence, the gateway (which accepts API keys where tokens are, when given them), and with
REDIS_URL the Redis fan-out, and hands out the Tornado handler.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..apikeys import ApiKeys
from ..auth import Tokens
from ..config import MAX_BACKLOG, Config
from ..store import Store
from ..tasks.service import EventsService
from ..util import OrjsonModule
from ..web import Origins
from .delivery import Delivery
from .gateway import EventsGateway
from .guard import GuardedServer, endpoint_handler, engineio_origins
from .presence import LocalPresence
from .rooms import IndexedManager
from .transport import Bound
from .handler import tornado_handler
from .sessions import AnonSessions, SessionLimits, admitting

log = logging.getLogger("droid.realtime")

MAX_PACKET = 64 * 1024
PING_INTERVAL_S = 25
PING_TIMEOUT_S = 20


class Realtime:
    """python-socketio's server, the gateway and everything under it, for one process."""

    def __init__(self, config: Config, *, store: Store, tokens: Tokens,
                 publisher: EventsService, origins: Origins, metrics: Any = None,
                 manager: Any = None, api_keys: ApiKeys | None = None) -> None:
        """`manager`: python-socketio's client manager (the Redis fan-out,
        droid/realtime/cluster.py), or None when this process holds every socket; `api_keys`:
        API keys (droid/apikeys.py), accepted where tokens are."""
        self.manager = manager
        self.publisher = publisher
        # python-socketio's rooms, indexed both ways (droid/realtime/rooms.py)
        client_manager = manager if manager is not None else IndexedManager()
        bound = Bound(messages=MAX_BACKLOG, bytes=config.max_backlog_bytes,
                      on_shed=(lambda sid: metrics.sockets_shed.inc()) if metrics else None)
        self.sio = GuardedServer(
            async_mode="tornado", client_manager=client_manager, namespaces="*",
            cors_allowed_origins=engineio_origins(origins), max_http_buffer_size=MAX_PACKET,
            json=OrjsonModule, ping_interval=PING_INTERVAL_S, ping_timeout=PING_TIMEOUT_S,
            logger=False, engineio_logger=False, bound=bound,
            sessions=AnonSessions(SessionLimits.from_config(config)))
        self.delivery = Delivery(store)
        publisher.listen(self.delivery.deliver)
        if manager is not None:
            manager.subscribe(publisher.receive, self.delivery.catch_up)
            self.presence: Any = manager.presence
        else:
            self.presence = LocalPresence()
        self.gateway = EventsGateway(self.sio, tokens, self.delivery, self.presence,
                                     metrics=metrics, counts_by_room=manager is not None,
                                     api_keys=api_keys)
        base = tornado_handler(self.sio.eio, compression=config.ws_compression)
        self.handler = admitting(endpoint_handler(base, self.sio.eio, origins),
                                 self.sio.sessions)

    async def notify(self, user_id: str, event: str, data: dict) -> None:
        """Send an event to every /events socket of the user, on every process."""
        await self.gateway.notify(user_id, event, data)

    def socket_count(self) -> int:
        """Live /events sockets in this process."""
        return len(self.gateway.sockets)

    async def start(self) -> None:
        if self.manager is not None:
            await self.manager.start()
        await self.presence.start()

    async def close_sockets(self) -> None:
        """Close every connection, so that clients reconnect (to another process)."""
        # python-socketio's shutdown stops its background tasks but leaves WebSocket
        # connections open.
        for transport in list(self.sio.eio.ws_transports.values()):
            transport.close(1001, "server shutting down")
        try:
            await asyncio.wait_for(self.sio.shutdown(), 5)
        except Exception:
            log.warning("closing Socket.IO connections did not finish cleanly", exc_info=True)

    async def stop(self) -> None:
        await self.delivery.close()
        await self.presence.stop()
        if self.manager is not None:
            await self.manager.close()
