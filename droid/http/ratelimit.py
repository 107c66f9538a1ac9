"""Rate limits on signing in and registering: per client address and per account (e-mail).

Each key has a token bucket: `capacity` attempts at once, refilled evenly over `per_s` seconds.
An empty bucket refuses with the seconds until the next attempt is allowed (`Retry-After`).

- Per address: every login and registration attempt counts (DROID_AUTH_ATTEMPTS_PER_ADDRESS a
  minute), checked before the body is read. An IPv6 address counts as its /64 (one host, or one
  customer of a provider, usually holds a whole /64), an IPv4-mapped one as its IPv4 address.
- Per account: failed logins and refused registrations of one e-mail count
  (DROID_AUTH_FAILURES_PER_ACCOUNT in 10 minutes). The key is the e-mail as given, registered or
  not, so a refusal says nothing about whether an account exists.

Buckets live in this process (with several processes each keeps its own). Why not the `limits`
library: its in-memory storages expire keys from a timer thread per pass (sync) or from one
thread hop per key per pass (asyncio), which costs more than these twenty lines; full buckets are
simply forgotten here, so memory stays bounded by the keys seen within one refill period.
"""
from __future__ import annotations

import ipaddress
import math
import time
from typing import Callable

from ..errors import ApiError


class RateLimited(ApiError):
    """429 with the seconds to wait, sent as `Retry-After` by the HTTP layer."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Buckets:
    """Token buckets by key: `capacity` attempts, one more every `per_s / capacity` seconds."""

    def __init__(self, capacity: int, per_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.interval = per_s / capacity
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._prune_at = 1024

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) / self.interval)

    def wait(self, key: str) -> int:
        """Seconds (rounded up) until `key` may make an attempt; 0 when it may now."""
        tokens = self._tokens(key, self.clock())
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) * self.interval))

    def take(self, key: str) -> int:
        """Count an attempt of `key`: 0 when allowed, else the seconds to wait (nothing taken)."""
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens < 1:
            return max(1, math.ceil((1 - tokens) * self.interval))
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) >= self._prune_at:
            self._prune(now)
        return 0

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self.capacity]
        for key in full:
            del self._buckets[key]
        self._prune_at = max(1024, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)


def address_key(address: str) -> str:
    """The key an address is counted under: an IPv4 address itself, an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthLimits:
    """The limits of POST /auth/login and POST /auth/register."""

    ACCOUNT_WINDOW_S = 600.0

    def __init__(self, attempts_per_address: int, failures_per_account: int) -> None:
        self.addresses = Buckets(attempts_per_address, 60.0)
        self.accounts = Buckets(failures_per_account, self.ACCOUNT_WINDOW_S)

    def attempt(self, address: str) -> None:
        """Count an attempt from `address`; raises RateLimited when it has made too many."""
        wait = self.addresses.take(address_key(address))
        if wait:
            raise RateLimited(f"Too many attempts from this address; retry in {wait} seconds",
                              wait)

    def check_account(self, email: str) -> None:
        """Raises RateLimited while the account has used up its failures."""
        wait = self.accounts.wait(email)
        if wait:
            raise RateLimited(f"Too many attempts for this account; retry in {wait} seconds",
                              wait)

    def failed(self, email: str) -> None:
        """Count a failed login or a refused registration of `email`."""
        self.accounts.take(email)
