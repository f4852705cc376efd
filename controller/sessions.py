"""Dashboard sessions: a browser logs in with an API token once and gets a cookie.

The cookie carries a random session id; the controller keeps, in memory, what it
maps to: the token's SHA-256 (never the token), its name and a CSRF token. Every
request made with the cookie looks the token up again, as a bearer request
would, so a revoked or expired token ends its sessions at their next request.
Sessions end on logout, after ``idle_s`` without a request, after ``lifetime_s``,
and when the controller restarts (they live in its memory only). Pure: no I/O,
time passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field, replace

#: The cookie's name; its value is the session id.
COOKIE = "tgfleet_session"
#: The header (fetch) and form field (plain forms) that carry a session's CSRF token.
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
#: Methods that change nothing: no CSRF token needed (the API keeps GET free of effects).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Session:
    token_sha256: str
    token_name: str
    csrf: str
    created_at: float
    seen_at: float


def _key(session_id: str) -> str:
    # Kept by the id's hash: what the controller holds cannot be replayed as a cookie.
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class Sessions:
    """Live sessions by id, bounded (the least recently used go first)."""

    idle_s: float = 12 * 3600.0
    lifetime_s: float = 7 * 86400.0
    max_sessions: int = 10_000
    _live: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    def open(self, token_sha256: str, token_name: str, now: float) -> tuple[str, Session]:
        """A new session for a token just checked; its id (the cookie's value)."""
        session_id = secrets.token_urlsafe(32)
        session = Session(token_sha256, token_name, secrets.token_urlsafe(32), now, now)
        self._live[_key(session_id)] = session
        while len(self._live) > self.max_sessions:
            self._live.popitem(last=False)
        return session_id, session

    def get(self, session_id: str, now: float) -> Session | None:
        """The live session of this id (its last use noted), or None."""
        key = _key(session_id)
        session = self._live.get(key)
        if session is None:
            return None
        if now - session.seen_at > self.idle_s or now - session.created_at > self.lifetime_s:
            del self._live[key]
            return None
        session = replace(session, seen_at=now)
        self._live[key] = session
        self._live.move_to_end(key)
        return session

    def close(self, session_id: str) -> None:
        self._live.pop(_key(session_id), None)

    def end_token(self, token_sha256: str | None = None, token_name: str | None = None) -> int:
        """End every session of a token (by hash or name); how many there were."""
        ended = [
            key
            for key, s in self._live.items()
            if s.token_sha256 == token_sha256 or s.token_name == token_name
        ]
        for key in ended:
            del self._live[key]
        return len(ended)

    def __len__(self) -> int:
        return len(self._live)


def csrf_matches(session: Session, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(session.csrf, presented)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _canonical(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, without the scheme's default port (a proxy
    may forward ``fleet.example:443`` where the browser's Origin says ``fleet.example``);
    None for anything else (``null``, a path, a user, a bad port)."""
    parts = urllib.parse.urlsplit(origin.strip().lower())
    try:
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path
        or parts.query
        or parts.fragment
    ):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def same_origin(origin: str | None, referer: str | None, scheme: str, host: str) -> bool:
    """Whether a write comes from a page of this server: its Origin header (or, when a
    browser sent none, its Referer) names ``scheme://host``. Neither: refused."""
    expected = _canonical(f"{scheme}://{host}")
    if expected is None:
        return False
    if origin is not None:
        return _canonical(origin) == expected
    if referer:
        parts = urllib.parse.urlsplit(referer)
        return _canonical(f"{parts.scheme}://{parts.netloc}") == expected
    return False
