"""The HTTP front door: the client's address, request heads, and the HTTP server's limits.

- **Which address is the client's.** `X-Forwarded-For` is used only on a connection from a
  trusted proxy (DROID_TRUSTED_PROXIES: addresses or networks, or `*` for any peer, which is
  what Heroku's router needs: its addresses are not fixed, and it appends the address it saw to
  the header). The client is then the right-most address of the header that is not itself a
  trusted proxy (with `*`, the right-most one). Tornado's own `xheaders` trusts the header from
  anyone, and prefers `X-Real-Ip`, which Heroku passes through from the client; it is off.
- **Request heads.** A head (request line and headers) over MAX_HEADER_BYTES is answered 431 in
  the JSON error shape. Tornado reads heads up to HARD_HEADER_BYTES; beyond that it closes the
  connection without an answer (as every server must at some size).
- **Time.** A request head must arrive within DROID_HEADER_TIMEOUT_S of the connection opening
  or of the previous answer (Tornado's `idle_connection_timeout`: the same clock closes idle
  keep-alive connections), and a body within DROID_BODY_TIMEOUT_S.
"""
from __future__ import annotations

import ipaddress
from typing import Any

import tornado.httputil
import tornado.web

from ..config import Config
from ..web import MAX_BODY, write_error

MAX_HEADER_BYTES = 64 * 1024
HARD_HEADER_BYTES = 4 * MAX_HEADER_BYTES


def server_options(config: Config) -> dict[str, Any]:
    """Keyword arguments of tornado.httpserver.HTTPServer."""
    return {
        "xheaders": False,  # Front applies X-Forwarded-For from trusted proxies only
        "max_header_size": HARD_HEADER_BYTES,
        "idle_connection_timeout": config.header_timeout_s,
        "body_timeout": config.body_timeout_s,
        # For handlers that buffer their body; those that stream it bound it themselves.
        "max_body_size": MAX_BODY,
    }


class Proxies:
    """DROID_TRUSTED_PROXIES: which peers' X-Forwarded-For and X-Forwarded-Proto are used."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self.any = "*" in trusted
        self.networks = tuple(ipaddress.ip_network(t, strict=False) for t in trusted if t != "*")

    def __bool__(self) -> bool:
        return self.any or bool(self.networks)

    def trusts(self, address: str | None) -> bool:
        if self.any:
            return True
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def client(self, peer: str | None, forwarded: str | None) -> str | None:
        """The client's address for a request from `peer` with this X-Forwarded-For."""
        if not forwarded or not self.trusts(peer):
            return peer
        hops = [h.strip() for h in forwarded.split(",")]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a malformed chain: believe none of it
            if self.any or not self.trusts(hop):
                return hop
        return hops[0]  # every hop is a trusted proxy: the first one is the client


def head_size(request: tornado.httputil.HTTPServerRequest) -> int:
    size = len(request.method or "") + len(request.uri or "") + len(request.version or "") + 4
    for name, value in request.headers.get_all():
        size += len(name) + len(value) + 4
    return size


class HeadTooLarge(tornado.web.RequestHandler):
    """431 in the JSON error shape, for any method."""

    def prepare(self) -> None:
        write_error(self, 431, f"Request line and headers must be at most {MAX_HEADER_BYTES} bytes",
                    error="Request Header Fields Too Large")


class Front(tornado.web.Application):
    """tornado.web.Application that settles the client's address and refuses oversized heads
    before routing (`find_handler` is Tornado's per-request routing hook)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxies = Proxies(self.settings["config"].trusted_proxies)

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        peer = request.remote_ip
        if self.proxies and self.proxies.trusts(peer):
            request.remote_ip = self.proxies.client(peer, request.headers.get("X-Forwarded-For"))
            proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
            if proto in ("http", "https"):
                request.protocol = proto
        if head_size(request) > MAX_HEADER_BYTES:
            return self.get_handler_delegate(request, HeadTooLarge)
        return super().find_handler(request, **kwargs)
