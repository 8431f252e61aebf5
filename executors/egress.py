"""The egress policy: which addresses the gateway may connect to on a tool's behalf.

Every URL the gateway reaches for a tool — an HTTP tool's ``url``, an MCP server's
``server_url`` — passes :meth:`EgressPolicy.check`, and the connection then goes to the address
that was checked (no second DNS resolution, so a name cannot resolve to a public address for the
check and to ``127.0.0.1`` for the connection: DNS rebinding). The configured upstreams are not
tools and do not pass here.

The check, in order:

1. the host is resolved (an IP literal in any form ``inet_aton`` accepts — ``2130706433``,
   ``0177.0.0.1``, ``0x7f.1`` — counts as that address; ``[::ffff:127.0.0.1]`` as 127.0.0.1);
2. if ``allowed_hosts`` is set, a host not on it is refused (``blocked_url``);
3. an address of the gateway's own listening sockets (any address it is bound to, every loopback
   and unspecified address, on a port it listens on) is refused, whatever is allow-listed;
4. a non-public address (:func:`blocked_reason`: loopback, link-local, private, unique-local,
   unspecified, multicast, reserved, shared/CGNAT, documentation, … including IPv4 addresses
   embedded in IPv6 as IPv4-mapped, IPv4-compatible, 6to4, NAT64 and Teredo) is refused unless
   the host is on ``allowed_hosts``, the address is in ``allowed_networks``, or the caller says
   ``allow_private`` (an admin-registered tool with ``allow_private: true``).

:class:`EgressTransport` (httpx) and :func:`httpx2_egress_transport` (httpx2, the MCP SDK's
client) apply the check to every request and dial the checked address, keeping the ``Host``
header and the TLS server name (SNI, certificate check) of the original name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = [
    "ALLOW_PRIVATE_EXTENSION",
    "EgressError",
    "EgressPolicy",
    "EgressTransport",
    "Pinned",
    "blocked_reason",
    "embedded_ipv4",
    "host_matches",
    "httpx2_egress_transport",
    "parse_ip",
    "pin_request",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Request extension (bool) that lets one request reach private addresses (admin-registered
#: tools with ``allow_private: true``); the transport removes it before sending.
ALLOW_PRIVATE_EXTENSION = "stepchain_allow_private"

_6TO4 = ipaddress.IPv6Network("2002::/16")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_TEREDO = ipaddress.IPv6Network("2001::/32")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")


class EgressError(Exception):
    """A URL the policy refuses; ``message`` names the host and why (never a header or body)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_ip(host: str) -> IPAddress | None:
    """The address a host string denotes literally, or None for a name.

    Accepts IPv6 with or without brackets (a zone ``%eth0`` is dropped) and every IPv4 form the
    C resolver accepts (``inet_aton``: decimal ``2130706433``, octal ``0177.0.0.1``, hex
    ``0x7f000001``, short ``127.1``), since ``getaddrinfo`` would connect to those too.
    """
    host = host.strip().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:
        host = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or not all(c.isalnum() or c == "." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and routes to, if any: IPv4-mapped
    (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), 6to4 (``2002:AABB:CCDD::``), NAT64
    (``64:ff9b::a.b.c.d``, ``64:ff9b:1::/48``) and Teredo (the client address)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    packed = address.packed
    if packed[:12] == bytes(12) and packed[12:] not in (bytes(4), b"\x00\x00\x00\x01"):
        return ipaddress.IPv4Address(packed[12:])  # deprecated IPv4-compatible form
    if address in _6TO4:
        return address.sixtofour
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(packed[12:])
    if address in _TEREDO and address.teredo is not None:
        return address.teredo[1]
    return None


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address (None if it is one).

    Reasons: ``loopback``, ``unspecified``, ``link-local``, ``private``, ``unique-local``,
    ``multicast``, ``reserved``, ``shared`` (100.64/10), ``not globally routable``; an IPv6
    address that embeds an IPv4 address is judged by that IPv4 address as well.
    """
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            reason = blocked_reason(inner)
            if reason is not None:
                return reason
            if address.ipv4_mapped is not None:
                return None
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.IPv6Network("fc00::/7"):
        return "unique-local"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "private"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


def host_matches(host: str, patterns: Collection[str]) -> bool:
    """``host`` equals a pattern, or matches ``*.example.com`` (any subdomain); no case."""
    host = host.rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern.strip("[]"):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Pinned:
    """A checked destination: connect to ``address`` for ``host`` (kept for Host and SNI)."""

    host: str
    port: int
    address: IPAddress


def _same(a: IPAddress, b: IPAddress) -> bool:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


class EgressPolicy:
    """The gateway's egress check (one per process; see the module docstring).

    ``allowed_hosts``: None = any host; else host names (``*.example.com`` for subdomains) or IP
    literals, the only hosts tools may reach, and hosts that may be private. ``allowed_networks``:
    CIDRs whose addresses may be reached although private (``127.0.0.0/8``, ``10.1.0.0/16``).
    ``own_ports`` / :meth:`note_own_socket`: where the gateway itself listens.
    Raises ValueError for a network that does not parse.
    """

    def __init__(
        self,
        *,
        allowed_hosts: Iterable[str] | None = None,
        allowed_networks: Iterable[str] = (),
        own_ports: Iterable[int] = (),
        own_addresses: Iterable[str] = (),
    ) -> None:
        self.allowed_hosts = (
            None if allowed_hosts is None else frozenset(h.strip() for h in allowed_hosts if h.strip())
        )
        self.allowed_networks = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in allowed_networks if n.strip()
        )
        self.own_ports: set[int] = {p for p in own_ports if p}
        self.own_addresses: set[IPAddress] = set()
        self._noted: set[tuple[Any, Any]] = set()
        for host in own_addresses:
            address = parse_ip(host)
            if address is not None:
                self.own_addresses.add(address)
        # (host, port, allow_private) -> the Pinned an IP-literal host checked to, while the
        # own sockets are those of ``_literals_for`` (an address literal needs no resolving:
        # the same check on the same input gives the same answer)
        self._literals: dict[tuple[str, int, bool], Pinned] = {}
        self._literals_for: tuple[int, int] = (-1, -1)

    @classmethod
    def from_settings(
        cls, allowed_hosts: str | None, allowed_networks: str | None, **kw: Any
    ) -> EgressPolicy:
        """A policy from the comma-separated ``tool_allowed_hosts`` / ``tool_allowed_networks``."""
        hosts = None if not allowed_hosts else [h for h in allowed_hosts.split(",") if h.strip()]
        networks = [n for n in (allowed_networks or "").split(",") if n.strip()]
        return cls(allowed_hosts=hosts, allowed_networks=networks, **kw)

    def note_own_socket(self, server: tuple[str, int] | list[Any] | None) -> None:
        """Remember a socket the gateway serves on (an ASGI ``scope["server"]``)."""
        if not server or len(server) < 2 or not server[1]:
            return
        key = (server[0], server[1])
        if key in self._noted:
            return  # every request names its socket: parse each one once
        self._noted.add(key)
        self.own_ports.add(int(server[1]))
        address = parse_ip(str(server[0]))
        if address is not None:
            self.own_addresses.add(address)

    def _is_own(self, address: IPAddress, port: int) -> bool:
        if port not in self.own_ports:
            return False
        plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
        if plain.is_loopback or plain.is_unspecified:
            return True
        return any(_same(address, own) or own.is_unspecified for own in self.own_addresses)

    def check_address(
        self, host: str, address: IPAddress, port: int, *, allow_private: bool = False
    ) -> None:
        """Raise EgressError if ``host`` at ``address``:``port`` may not be reached."""
        if self._is_own(address, port):
            raise EgressError(f"{host}:{port} is this gateway's own address")
        reason = blocked_reason(address)
        if reason is None or allow_private:
            return
        if self.allowed_hosts is not None and host_matches(host, self.allowed_hosts):
            return
        plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
        if any(plain in net or address in net for net in self.allowed_networks):
            return
        shown = host if str(address) == host else f"{host} ({address})"
        raise EgressError(
            f"{shown} is a {reason} address; allow it with tool_allowed_networks or "
            "tool_allowed_hosts"
        )

    async def resolve(self, host: str, port: int, *, allow_private: bool = False) -> Pinned:
        """Check ``host``:``port`` and return the address to connect to. Every address the name
        resolves to must pass; raises EgressError (also when the name does not resolve)."""
        if not host:
            raise EgressError("the URL has no host")
        own = (len(self.own_ports), len(self.own_addresses))
        if own == self._literals_for:
            hit = self._literals.get((host, port, allow_private))
            if hit is not None:
                return hit
        if self.allowed_hosts is not None and not host_matches(host, self.allowed_hosts):
            raise EgressError(f"host {host!r} is not in tool_allowed_hosts")
        literal = parse_ip(host)
        if literal is not None:
            self.check_address(host, literal, port, allow_private=allow_private)
            pinned = Pinned(host, port, literal)
            if own != self._literals_for:
                self._literals.clear()
                self._literals_for = own
            if len(self._literals) < 1024:
                self._literals[(host, port, allow_private)] = pinned
            return pinned
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise EgressError(f"host {host!r} does not resolve: {exc}") from None
        addresses: list[IPAddress] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise EgressError(f"host {host!r} does not resolve")
        for address in addresses:
            self.check_address(host, address, port, allow_private=allow_private)
        return Pinned(host, port, addresses[0])

    async def check_url(self, url: str, *, allow_private: bool = False) -> Pinned:
        """:meth:`resolve` for the host and port of an http(s) URL."""
        try:
            parsed = urlsplit(url)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError as exc:
            raise EgressError(f"not a valid URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise EgressError(f"only http(s) URLs may be reached, got {parsed.scheme!r}")
        return await self.resolve(parsed.hostname or "", port, allow_private=allow_private)


async def pin_request(policy: EgressPolicy, request: Any, allow_private: bool) -> None:
    """Check ``request`` (httpx or httpx2) and point it at the checked address of its host, in
    place (Host header and TLS server name stay the name's). Raises EgressError."""
    url = request.url
    allow = bool(request.extensions.pop(ALLOW_PRIVATE_EXTENSION, False)) or allow_private
    port = url.port or (443 if url.scheme == "https" else 80)
    pinned = await policy.resolve(url.host, port, allow_private=allow)
    # (A host equal to the address's text is that address literally: nothing to rewrite.)
    if str(pinned.address) != url.host:
        # The Host header was set from the name when the request was built and stays.
        request.url = url.copy_with(host=str(pinned.address))
        if url.scheme == "https":
            request.extensions["sni_hostname"] = url.host


class EgressTransport(httpx.AsyncBaseTransport):
    """An httpx transport that checks every request with ``policy`` and dials the checked
    address (over ``inner``, by default an ``httpx.AsyncHTTPTransport``). A request may carry the
    extension ``ALLOW_PRIVATE_EXTENSION: True``; ``allow_private`` sets it for all."""

    def __init__(
        self,
        policy: EgressPolicy,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        allow_private: bool = False,
        limits: httpx.Limits | None = None,
    ) -> None:
        self.policy = policy
        self.allow_private = allow_private
        self._inner = inner or httpx.AsyncHTTPTransport(
            limits=limits or httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await pin_request(self.policy, request, self.allow_private)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def httpx2_egress_transport(policy: EgressPolicy, *, allow_private: bool = False) -> Any:
    """The same transport for ``httpx2`` (the client the ``mcp`` SDK uses)."""
    import httpx2

    class _Httpx2EgressTransport(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            await pin_request(policy, request, allow_private)
            return await self._inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self._inner.aclose()

    return _Httpx2EgressTransport()
