"""Where webhooks may be sent (droid/webhooks/ssrf.py), as functions: every address class, IPv4
inside IPv6, names with several addresses, the URL rules, production's https; and the
configuration that shortens the retry schedule or opens private addresses (warned at start)."""
from __future__ import annotations

import ipaddress
import logging
import socket

import pytest

from conftest import make_config
from droid.config import ConfigError
from droid.webhooks.ssrf import Refused, address_class, check_url, checked_addresses

CLASSES = {
    "loopback": ["127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1", "::127.0.0.1",
                 "64:ff9b::7f00:1", "2002:7f00:1::1"],
    "private": ["10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.0.1", "100.64.0.1",
                "fc00::1", "fd12:3456::1", "fec0::1", "::ffff:192.168.1.1"],
    "link-local": ["169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.169.254"],
    "multicast": ["224.0.0.1", "239.255.255.250", "ff02::1", "ff05::2", "::ffff:224.0.0.1"],
    "unspecified": ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"],
    "reserved": ["240.0.0.1", "255.255.255.255"],
    None: ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8",
           "64:ff9b::808:808"],
}


@pytest.mark.parametrize("kind", list(CLASSES), ids=lambda k: str(k))
def test_every_address_class(kind) -> None:
    for address in CLASSES[kind]:
        assert address_class(ipaddress.ip_address(address)) == kind, address


def lookup_of(*addresses: str):
    async def lookup(host: str, port: int) -> list[tuple]:
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]
    return lookup


@pytest.mark.asyncio
async def test_a_name_is_refused_when_any_of_its_addresses_is() -> None:
    ok = await checked_addresses("hooks.example", 443, allow_private=False,
                                 lookup=lookup_of("93.184.216.34", "2606:2800:220:1::1"))
    assert [a[1][0] for a in ok] == ["93.184.216.34", "2606:2800:220:1::1"]
    with pytest.raises(Refused, match=r"resolves to a private address \(10\.0\.0\.7\)"):
        await checked_addresses("hooks.example", 443, allow_private=False,
                                lookup=lookup_of("93.184.216.34", "10.0.0.7"))
    # open to private and loopback, never to link-local
    assert await checked_addresses("hooks.example", 80, allow_private=True,
                                   lookup=lookup_of("10.0.0.7", "127.0.0.1"))
    with pytest.raises(Refused, match="link-local"):
        await checked_addresses("hooks.example", 80, allow_private=True,
                                lookup=lookup_of("169.254.169.254"))
    # a literal is checked without a lookup; a scoped IPv6 address by its address
    with pytest.raises(Refused, match=r"is a loopback address \(::1\)"):
        await checked_addresses("[::1]", 80, allow_private=False)
    with pytest.raises(Refused, match="link-local"):
        await checked_addresses("hooks.example", 80, allow_private=True,
                                lookup=lookup_of("fe80::1%eth0"))
    # localhost really resolves (/etc/hosts) to loopback
    with pytest.raises(Refused, match="resolves to a loopback address"):
        await checked_addresses("localhost", 80, allow_private=False)


def test_url_rules_and_https_in_production() -> None:
    assert check_url("https://example.com/hook?x=1", production=True).hostname == "example.com"
    assert check_url("http://example.com:8080/", production=False).port == 8080
    for url, message in (("ftp://example.com/", "url must start with http:// or https://"),
                         ("example.com/hook", "url must start with http:// or https://"),
                         ("http:///nohost", "url must have a host"),
                         ("http://user:pw@example.com/", "url must not contain credentials"),
                         ("http://example.com:99999/", "url is not a valid URL"),
                         ("http://exa mple.com/", "url must not contain spaces or control "
                                                 "characters")):
        with pytest.raises(Refused) as info:
            check_url(url, production=False)
        assert str(info.value) == message, url
    with pytest.raises(Refused, match=r"url must use https \(DROID_ENV=production\)"):
        check_url("http://example.com/", production=True)


def test_webhook_configuration() -> None:
    config = make_config()
    assert config.webhook_retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000, 86400)
    assert config.webhook_allow_private is False and config.webhook_timeout_s == 15
    assert config.webhook_disable_after_s == 5 * 86400
    assert make_config(DROID_WEBHOOK_RETRY_SCHEDULE="0, 0.5,2").webhook_retry_schedule == \
        (0, 0.5, 2)
    for bad in ("fast", "1,-2", "1,,2", "nan", "inf", ",".join(["1"] * 21), "700000"):
        with pytest.raises(ConfigError, match="DROID_WEBHOOK_RETRY_SCHEDULE"):
            make_config(DROID_WEBHOOK_RETRY_SCHEDULE=bad)
    with pytest.raises(ConfigError, match="DROID_WEBHOOK_ALLOW_PRIVATE"):
        make_config(DROID_WEBHOOK_ALLOW_PRIVATE="maybe")


@pytest.mark.asyncio
async def test_allowing_private_addresses_is_warned_at_start(droid_factory, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="droid.webhooks"):
        await droid_factory()
        assert "DROID_WEBHOOK_ALLOW_PRIVATE" not in caplog.text
        await droid_factory(DROID_WEBHOOK_ALLOW_PRIVATE="true")
    assert "DROID_WEBHOOK_ALLOW_PRIVATE=true: webhook endpoints may point at loopback and " \
           "private addresses" in caplog.text
