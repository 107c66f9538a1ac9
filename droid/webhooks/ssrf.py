"""No server-side request forgery: where a webhook may be sent, checked when an endpoint is
saved and again at every delivery, on the very addresses the connection then uses.

An endpoint's host is refused when any address it resolves to is loopback, private (RFC 1918,
unique-local, site-local, shared 100.64/10), link-local (cloud metadata at 169.254.169.254
included), multicast, unspecified or otherwise not global, IPv4 and IPv6 alike, IPv4 addresses
inside IPv6 ones (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) judged as the IPv4 address
they carry. DROID_WEBHOOK_ALLOW_PRIVATE=true opens loopback and private addresses (tests,
on-premises receivers); never link-local, multicast or unspecified ones.

`CheckedResolver` is the resolver of the HTTP client that delivers: Tornado connects to what it
returns, which is what it checked, so a name that resolves to a public address when checked and
to a private one a moment later (DNS rebinding) cannot slip through between check and connect.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from typing import Any, Awaitable, Callable
from urllib.parse import SplitResult, urlsplit

from tornado.netutil import Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str, int], Awaitable[list[tuple]]]
RESOLVE_TIMEOUT_S = 5.0

_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
ALLOW_HINT = " (DROID_WEBHOOK_ALLOW_PRIVATE=true allows private and loopback addresses)"


class Refused(Exception):
    """A URL or an address webhooks may not be sent to; the message says why."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


@functools.lru_cache(maxsize=4096)
def address_class(ip: IPAddress) -> str | None:
    """What makes an address unfit for webhooks ("loopback", "private", ...), None when it is
    a global unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:  # the connection ends at the IPv4 address it carries
            return address_class(inner)
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link-local"
    if ip.is_loopback:
        return "loopback"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or ip in _SHARED or getattr(ip, "is_site_local", False):
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def refusal(ip: IPAddress, allow_private: bool) -> str | None:
    kind = address_class(ip)
    if kind in ("loopback", "private") and allow_private:
        return None
    return kind


@functools.lru_cache(maxsize=4096)  # at every delivery: the same few URLs again and again
def check_url(url: str, *, production: bool) -> SplitResult:
    """The parts of an endpoint URL Droid may send to; Refused says what is wrong with it."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise Refused("url is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("url must start with http:// or https://")
    if production and parts.scheme != "https":
        raise Refused("url must use https (DROID_ENV=production)")
    if not parts.hostname:
        raise Refused("url must have a host")
    if parts.username is not None or parts.password is not None:
        raise Refused("url must not contain credentials")
    if any(c.isspace() or ord(c) < 32 for c in url.strip()):
        raise Refused("url must not contain spaces or control characters")
    return parts


async def _getaddrinfo(host: str, port: int) -> list[tuple]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def checked_addresses(host: str, port: int, *, allow_private: bool,
                            lookup: Lookup | None = None) -> list[tuple[int, Any]]:
    """Every address of `host` as (family, sockaddr), once all have passed; Refused names the
    first that does not, OSError when the name does not resolve."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        infos = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, socket.SOCK_STREAM,
                  0, "", (str(literal), port))]
    else:
        infos = await asyncio.wait_for((lookup or _getaddrinfo)(host, port), RESOLVE_TIMEOUT_S)
    out = []
    for family, _, _, _, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        kind = refusal(ip, allow_private)
        if kind is not None:
            where = "is" if literal is not None else "resolves to"
            hint = ALLOW_HINT if kind in ("loopback", "private") else ""
            raise Refused(f"url host {host} {where} a {kind} address ({ip}){hint}")
        out.append((family, sockaddr))
    if not out:
        raise OSError(f"{host} has no address")
    return out


class CheckedResolver(Resolver):
    """Tornado's resolver for webhook deliveries: only addresses that pass the check."""

    def initialize(self, allow_private: bool = False) -> None:  # type: ignore[override]
        self.allow_private = allow_private
        self.lookup: Lookup | None = None  # replaceable (tests): (host, port) -> getaddrinfo's

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        addresses = await checked_addresses(host, port, allow_private=self.allow_private,
                                            lookup=self.lookup)
        if family != socket.AF_UNSPEC:
            addresses = [a for a in addresses if a[0] == family]
        return addresses

    def close(self) -> None:
        pass
