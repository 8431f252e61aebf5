"""The egress policy: the address classifier (hypothesis), the check, and pinned connections
against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import socket
import struct
import warnings

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from executors.egress import (
    EgressError,
    EgressPolicy,
    EgressTransport,
    blocked_reason,
    embedded_ipv4,
    parse_ip,
    pin_request,
)
from gateway.testing.serving import serve_app

@pytest.fixture(autouse=True, scope="module")
def _collect_earlier_garbage() -> None:
    """Sockets leaked by earlier test modules (bench's load generator closes its streams without
    waiting) would otherwise be reported as ResourceWarnings against this module's first test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


PRIVATE_V4 = [
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "0.0.0.0/8", "100.64.0.0/10", "224.0.0.0/4", "240.0.0.0/4",
]
PUBLIC_V4 = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "151.101.1.69"]

v4_private = st.sampled_from(PRIVATE_V4).flatmap(
    lambda net: st.integers(0, ipaddress.ip_network(net).num_addresses - 1).map(
        lambda i, net=net: ipaddress.ip_network(net)[i]
    )
)
v4_any = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


def _ipv4_forms(address: ipaddress.IPv4Address) -> list[str]:
    n = int(address)
    a, b, c, d = address.packed
    return [
        str(n),  # decimal: http://2130706433/
        hex(n),  # 0x7f000001
        ".".join(f"0{o:o}" for o in (a, b, c, d)),  # octal: 0177.0.0.01
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1 style
        f"0x{a:x}.{b}.{c}.{d}",
        f"::ffff:{address}",  # IPv4-mapped IPv6
        f"[::ffff:{address}]",
        f"64:ff9b::{address}",  # NAT64
        str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80))),  # 6to4
    ]


@given(v4_private)
def test_private_ipv4_in_every_spelling_is_blocked(address: ipaddress.IPv4Address) -> None:
    assert blocked_reason(address) is not None
    for form in _ipv4_forms(address):
        parsed = parse_ip(form)
        assert parsed is not None, form
        assert blocked_reason(parsed) is not None, form


@given(v4_any)
def test_every_spelling_is_judged_like_the_address(address: ipaddress.IPv4Address) -> None:
    expected = blocked_reason(address) is None
    for form in _ipv4_forms(address):
        parsed = parse_ip(form)
        assert parsed is not None, form
        if not expected:
            assert blocked_reason(parsed) is not None, form
        if isinstance(parsed, ipaddress.IPv4Address):
            assert parsed == address, form


@given(st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
def test_ipv6_embedding_a_blocked_ipv4_is_blocked(address: ipaddress.IPv6Address) -> None:
    inner = embedded_ipv4(address)
    if inner is not None and blocked_reason(inner) is not None:
        assert blocked_reason(address) is not None
    if address.is_loopback or address.is_link_local or address.is_private or address.is_multicast:
        assert blocked_reason(address) is not None


@pytest.mark.parametrize(
    "host, reason",
    [
        pytest.param("127.0.0.1", "loopback", id="loopback"),
        pytest.param("2130706433", "loopback", id="decimal"),
        pytest.param("0177.0.0.1", "loopback", id="octal"),
        pytest.param("0x7f.1", "loopback", id="hex-short"),
        pytest.param("::1", "loopback", id="v6-loopback"),
        pytest.param("::ffff:127.0.0.1", "loopback", id="v4-mapped"),
        pytest.param("169.254.169.254", "link-local", id="metadata"),
        pytest.param("fe80::1", "link-local", id="v6-link-local"),
        pytest.param("fd00::1", "unique-local", id="unique-local"),
        pytest.param("10.1.2.3", "private", id="rfc1918"),
        pytest.param("0.0.0.0", "unspecified", id="unspecified"),
        pytest.param("::", "unspecified", id="v6-unspecified"),
        pytest.param("239.1.1.1", "multicast", id="multicast"),
        pytest.param("2002:7f00:1::", "loopback", id="6to4"),
        pytest.param("64:ff9b::a9fe:a9fe", "link-local", id="nat64"),
    ],
)
def test_reasons(host: str, reason: str) -> None:
    address = parse_ip(host)
    assert address is not None
    assert blocked_reason(address) == reason


@pytest.mark.parametrize("host", PUBLIC_V4 + ["2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(host: str) -> None:
    address = parse_ip(host)
    assert address is not None and blocked_reason(address) is None


@pytest.mark.parametrize("host", ["example.com", "localhost", "1.2.3.4.example", "", "a b"])
def test_names_are_not_literals(host: str) -> None:
    assert parse_ip(host) is None


# -- the check -----------------------------------------------------------------------------------


def check(policy: EgressPolicy, url: str, **kw: bool) -> str:
    async def run() -> str:
        return str((await policy.check_url(url, **kw)).address)

    return asyncio.run(run())


def refused(policy: EgressPolicy, url: str, **kw: bool) -> str:
    with pytest.raises(EgressError) as info:
        check(policy, url, **kw)
    return info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/", "http://localhost:9/", "http://2130706433/", "http://0x7f000001/",
        "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/", "http://10.0.0.1/", "http://[fd12::1]/", "http://0.0.0.0/",
    ],
)
def test_default_policy_refuses_private(url: str) -> None:
    message = refused(EgressPolicy(), url)
    assert "address" in message


def test_allowed_networks_and_hosts_and_allow_private() -> None:
    loopback = EgressPolicy(allowed_networks=["127.0.0.0/8", "::1/128"])
    assert check(loopback, "http://localhost:9/") in ("127.0.0.1", "::1")
    assert check(EgressPolicy(allowed_networks=["127.0.0.0/8"]), "http://2130706433/") == "127.0.0.1"
    assert check(EgressPolicy(allowed_hosts=["127.0.0.1"]), "http://127.0.0.1/") == "127.0.0.1"
    assert check(EgressPolicy(), "http://10.0.0.1/", allow_private=True) == "10.0.0.1"
    # An allow-list of hosts is also a restriction.
    assert "not in tool_allowed_hosts" in refused(
        EgressPolicy(allowed_hosts=["api.example.com"]), "http://8.8.8.8/"
    )
    # A network allows only its own addresses.
    refused(EgressPolicy(allowed_networks=["10.0.0.0/8"]), "http://127.0.0.1/")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.2", "2130706433", "0177.0.0.1", "[::ffff:127.0.0.1]", "0.0.0.0",
     "localhost"],
)
def test_own_port_is_blocked_by_address_whatever_the_name(host: str) -> None:
    policy = EgressPolicy(allowed_networks=["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"])
    policy.note_own_socket(("127.0.0.1", 8123))
    message = refused(policy, f"http://{host}:8123/", allow_private=True)
    assert "own address" in message
    assert check(policy, "http://127.0.0.1:8124/") == "127.0.0.1"


def test_own_non_loopback_address_is_blocked() -> None:
    policy = EgressPolicy(allowed_networks=["10.0.0.0/8"])
    policy.note_own_socket(("10.1.2.3", 8080))
    refused(policy, "http://10.1.2.3:8080/", allow_private=True)
    assert check(policy, "http://10.1.2.4:8080/") == "10.1.2.4"


def test_a_passed_literal_check_is_not_reused_once_an_own_socket_is_noted() -> None:
    """Checks of address literals are remembered, but never past a change of the gateway's own
    sockets: a port that passed becomes refused the moment the gateway is seen listening on it."""
    policy = EgressPolicy(allowed_networks=["127.0.0.0/8"])
    for _ in range(2):  # the second answer comes from the remembered check
        assert check(policy, "http://127.0.0.1:8125/") == "127.0.0.1"
    policy.note_own_socket(("127.0.0.1", 8125))
    assert "own address" in refused(policy, "http://127.0.0.1:8125/")
    policy.note_own_socket(("127.0.0.1", 8125))  # the same socket again: still refused
    assert "own address" in refused(policy, "http://127.0.0.1:8125/")
    # A refusal is never remembered as a pass, and allow_private is part of what was checked.
    strict = EgressPolicy()
    assert check(strict, "http://10.0.0.1/", allow_private=True) == "10.0.0.1"
    assert "private" in refused(strict, "http://10.0.0.1/")
    assert "private" in refused(strict, "http://10.0.0.1/")


def test_unresolvable_name_is_refused() -> None:
    assert "does not resolve" in refused(EgressPolicy(), "http://no-such-host.invalid/")


# -- pinned connections --------------------------------------------------------------------------


async def _headers(request: Request) -> JSONResponse:
    return JSONResponse({"host": request.headers.get("host")})


def test_request_goes_to_the_checked_address_with_the_name_as_host() -> None:
    with serve_app(Starlette(routes=[Route("/h", _headers)])) as url:
        port = int(url.rsplit(":", 1)[1])
        policy = EgressPolicy(allowed_networks=["127.0.0.0/8", "::1/128"])

        async def run() -> tuple[str, dict[str, str]]:
            request = httpx.Request("GET", f"http://localhost:{port}/h")
            await pin_request(policy, request, False)
            async with httpx.AsyncClient(transport=EgressTransport(policy)) as client:
                response = await client.get(f"http://localhost:{port}/h")
            return str(request.url.host), response.json()

        dialed, seen = asyncio.run(run())
    assert parse_ip(dialed) is not None  # the name was replaced by the checked address
    assert seen == {"host": f"localhost:{port}"}


def test_transport_refuses_before_connecting() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:

        async def run() -> None:
            async with httpx.AsyncClient(transport=EgressTransport(EgressPolicy())) as client:
                await client.get(f"http://127.0.0.1:{port}/")

        with pytest.raises(EgressError):
            asyncio.run(run())
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_packed_forms_match() -> None:
    n = struct.unpack("!I", socket.inet_aton("127.0.0.1"))[0]
    assert parse_ip(str(n)) == ipaddress.IPv4Address("127.0.0.1")
