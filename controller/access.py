"""Who may do what over the API: token scopes, the failed-authentication throttle,
and the refusals counted for /metrics. Pure: no I/O, time passed in."""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Scope = Literal["read", "operate", "admin"]
#: Each scope allows what the ones before it allow: admin ⊃ operate ⊃ read.
SCOPES: tuple[Scope, ...] = get_args(Scope)

#: Why a request was refused: the bounded label set of tgfleet_api_refusals_total.
RefusalReason = Literal[
    "missing", "unknown", "revoked", "expired", "token_in_query", "scope", "rate_limited", "csrf"
]
REFUSAL_REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)

#: Query parameters that a client may have put a token in (refused: URLs leak into
#: logs, proxies and shell history).
TOKEN_QUERY_KEYS = frozenset({"token", "access_token", "api_token", "bearer", "authorization"})
TOKEN_PREFIX = "tgf_"


def allows(held: Scope, needed: Scope) -> bool:
    """Whether a token of scope ``held`` may do what needs ``needed``."""
    return SCOPES.index(held) >= SCOPES.index(needed)


def token_in_query(query: dict[str, str]) -> bool:
    """Whether a query string carries something that looks like an API token."""
    return any(
        key.lower() in TOKEN_QUERY_KEYS or value.startswith(TOKEN_PREFIX)
        for key, value in query.items()
    )


_DURATION = re.compile(r"^(\d{1,7})([smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` → seconds; ValueError otherwise."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise ValueError(f"{text!r} is no duration: a positive number with s, m, h, d or w")
    return int(found.group(1)) * _UNIT_S[found.group(2)]


def trusted_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses or networks (``10.0.0.5``, ``10.0.0.0/8``, ``::1``); ValueError naming
    the first that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(networks)


def _trusted(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(
    remote: str | None, forwarded_for: Iterable[str], proxies: tuple[IPNetwork, ...]
) -> str:
    """Who a request is from, for the throttle: the peer, unless the peer is a trusted
    proxy; then the right-most ``X-Forwarded-For`` hop that no trusted proxy added.

    Only hops added by proxies we trust are believed: whatever is left of them the
    client wrote itself. A hop that is no IP address ends the walk (the proxy before
    it is who we know of)."""
    peer = remote or "unknown"
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return client
        client = hop
        if not _trusted(hop, proxies):
            return client
    return client


#: What a trusted proxy may say the client used (X-Forwarded-Proto).
FORWARDED_SCHEMES = frozenset({"http", "https"})
#: A host as a proxy may forward it (X-Forwarded-Host): a DNS name or an IP address, in
#: brackets for IPv6, and a port; nothing that could carry a path, user or second host.
_FORWARDED_HOST = re.compile(
    r"(?P<name>[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
    r"|\[(?P<ipv6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)


def _last_value(headers: Iterable[str]) -> str | None:
    """The last value of a header that may be repeated or comma-separated: what our
    peer, the trusted proxy, wrote. Values before it came from further away: a proxy
    that appends (or passes a header through) keeps the client's own in front."""
    last = None
    for header in headers:
        last = header.rsplit(",", 1)[-1].strip()
    return last


def forwarded_host_valid(host: str) -> bool:
    """Whether ``host`` is a host (and port) a proxy may forward."""
    if len(host) > 261:  # 253 for the name, 6 for ":65535", 2 for []
        return False
    found = _FORWARDED_HOST.fullmatch(host)
    if found is None:
        return False
    if found["port"] is not None and not 0 < int(found["port"]) <= 65535:
        return False
    if found["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(found["ipv6"])
        except ValueError:
            return False
    return True


def forwarded_origin(
    remote: str | None,
    scheme: str,
    host: str,
    forwarded_proto: Iterable[str],
    forwarded_host: Iterable[str],
    proxies: tuple[IPNetwork, ...],
) -> tuple[str, str]:
    """The scheme and host the client asked for: the request's own, unless the peer is
    a trusted proxy; then the last value of its ``X-Forwarded-Proto`` and
    ``X-Forwarded-Host`` where it sent them (a TLS-terminating proxy speaks plain HTTP
    to us on another address than the one the browser used): the one it wrote itself,
    never one a client sent that it passed on (nginx: ``proxy_set_header``, which
    replaces the client's).

    A peer we do not trust cannot change either; a value that is no scheme or host is
    ignored (the request's own stays, which a browser's Origin will not match)."""
    if remote is None or not proxies or not _trusted(remote, proxies):
        return scheme, host
    proto = _last_value(forwarded_proto)
    if proto is not None and proto.lower() in FORWARDED_SCHEMES:
        scheme = proto.lower()
    named = _last_value(forwarded_host)
    if named is not None and forwarded_host_valid(named):
        host = named
    return scheme, host


@dataclass
class AuthThrottle:
    """Failed authentications per client address, in a sliding window.

    After ``limit`` failures within ``window_s``, that address is refused (429)
    until the oldest of them leaves the window, whatever token it sends: a
    guesser learns nothing more. Only presented-but-wrong tokens count (a missing
    header guesses nothing). At most ``max_clients`` addresses are remembered
    (the least recently failing are forgotten first), so memory stays bounded.
    """

    limit: int = 10
    window_s: float = 60.0
    max_clients: int = 10_000
    #: Reverse proxies whose X-Forwarded-For is believed (none: the peer is the client).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(client, None)
        return times

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until ``client`` may try again, or None if it may now."""
        times = self._recent(client, now)
        if len(times) < self.limit:
            return None
        return max(1, int(times[0] + self.window_s - now + 0.999))

    def failed(self, client: str, now: float) -> None:
        times = self._recent(client, now)
        times.append(now)
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


@dataclass
class Refusals:
    """How many requests were refused, by reason (all reasons present, from 0)."""

    counts: dict[RefusalReason, int] = field(
        default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0)
    )

    def count(self, reason: RefusalReason) -> None:
        self.counts[reason] += 1
