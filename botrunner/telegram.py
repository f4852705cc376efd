"""The bot's Telegram client: building it, logging in, and what its errors mean.

Everything here waits under a timeout: Telethon's ``connect()`` to a peer that
accepts and stays silent never returns by itself. Failures are sorted by
``classify`` (pure, tested by table) into rejected credentials (fatal: a
restart cannot fix them), FloodWait (wait as told, report it) and everything
else (report, back off, retry).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptg
import rsa
from telethon import TelegramClient, errors, functions, types
from telethon.crypto import rsa as telethon_rsa
from telethon.crypto.factorization import Factorization
from telethon.errors.rpcerrorlist import rpc_errors_dict
from telethon.sessions import SQLiteSession, StringSession

from botrunner.config import BotConfig
from botrunner.health import TelegramStatus
from botspec.protocol import ReadyTelegram
from botspec.validate import rsa_public_numbers

log = logging.getLogger(__name__)

SESSION_FILE = "telegram.session"
# Which credentials and server the session file was made for; a mismatch means
# its auth key belongs to someone else, so the file is discarded.
SESSION_OWNER_FILE = "telegram.session.owner"
DEFAULT_FLOOD_SLEEP_S = 60
DISCONNECT_TIMEOUT_S = 3.0
MAX_RETRY_DELAY_S = 30.0

_ERROR_NAMES: dict[type[BaseException], str] = {cls: name for name, cls in rpc_errors_dict.items()}

#: Credentials Telegram refuses; restarting the bot cannot change that.
AUTH_REJECTIONS: tuple[type[BaseException], ...] = (
    errors.UnauthorizedError,  # AUTH_KEY_UNREGISTERED, SESSION_REVOKED, USER_DEACTIVATED, …
    errors.AuthKeyDuplicatedError,
    errors.AccessTokenInvalidError,
    errors.AccessTokenExpiredError,
    errors.ApiIdInvalidError,
    errors.ApiIdPublishedFloodError,
)


class AuthRejected(Exception):
    """Telegram refused the bot's credentials."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error = error  # Telegram's name, e.g. ACCESS_TOKEN_INVALID
        self.detail = detail


@dataclass(frozen=True)
class FloodWait:
    seconds: float


@dataclass(frozen=True)
class Transient:
    error: str  # for heartbeats' last_error


Outcome = AuthRejected | FloodWait | Transient


def error_name(exc: BaseException) -> str:
    """Telegram's name for an RPC error (ACCESS_TOKEN_INVALID), else the class name."""
    name = _ERROR_NAMES.get(type(exc))
    if name is not None:
        return name
    message = getattr(exc, "message", None)
    if isinstance(exc, errors.RPCError) and isinstance(message, str) and message:
        return message
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(exc: BaseException) -> Outcome:
    """What a failed call to Telegram means for the bot."""
    if isinstance(exc, AuthRejected):
        return exc
    if isinstance(exc, AUTH_REJECTIONS):
        return AuthRejected(error_name(exc), str(exc))
    if isinstance(exc, errors.FloodWaitError | errors.FloodPremiumWaitError):
        return FloodWait(float(exc.seconds))
    return Transient(describe(exc))


def retry_delay_s(failures: int) -> float:
    """Back-off before the next login attempt after ``failures`` failed ones (>= 1)."""
    delay: float = 0.5 * 2.0 ** max(0, failures - 1)
    return min(MAX_RETRY_DELAY_S, delay)


def token_bot_id(token: str) -> str:
    return token.partition(":")[0]


def session_owner(config: BotConfig) -> str:
    """A digest of what the session file's auth key is tied to (no secret is stored)."""
    server = config.telegram.server
    parts = [
        config.token or "",
        str(config.telegram.api_id),
        "" if server is None else f"{server.host}:{server.port}:{server.dc_id}",
        "" if server is None else server.public_key.strip(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def open_session(config: BotConfig) -> SQLiteSession | StringSession:
    """The session this bot logs in with.

    A token bot keeps an SQLite session file in its data dir (only this process
    opens it); a user account runs on the StringSession from its config.
    """
    if config.session is not None:
        return StringSession(config.session)
    data_dir = Path(config.data_dir)
    owner_file = data_dir / SESSION_OWNER_FILE
    owner = session_owner(config)
    try:
        known_owner = owner_file.read_text().strip()
    except FileNotFoundError:
        known_owner = None
    if known_owner != owner:
        for suffix in ("", "-journal", "-wal", "-shm"):
            (data_dir / f"{SESSION_FILE}{suffix}").unlink(missing_ok=True)
        owner_file.write_text(owner + "\n")
        owner_file.chmod(0o600)
    return WalSession(str(data_dir / SESSION_FILE))


class WalSession(SQLiteSession):  # type: ignore[misc]  # Telethon is untyped
    """Telethon's SQLite session in write-ahead-log mode with ``synchronous=NORMAL``:
    a commit (creating the file, saving a new auth key, each update-state checkpoint)
    no longer waits on fsync. Creating a session took 27-97 ms here against 15-18 ms,
    on the path of every new bot's first connect. What a power cut can cost is the
    last commits, never a corrupt file: a token bot then makes a new auth key, and
    catch-up fetches again what came after an older update state."""

    _conn: sqlite3.Connection | None  # Telethon's, opened on first use

    def _cursor(self) -> sqlite3.Cursor:
        if self._conn is None:
            conn = sqlite3.connect(self.filename, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn.cursor()


#: Requests that send messages, and how many each sends.
_SENDS: dict[type[Any], Callable[[Any], int]] = {
    functions.messages.SendMessageRequest: lambda _: 1,
    functions.messages.SendMediaRequest: lambda _: 1,
    functions.messages.SendInlineBotResultRequest: lambda _: 1,
    functions.messages.SendMultiMediaRequest: lambda r: len(r.multi_media),
    functions.messages.ForwardMessagesRequest: lambda r: len(r.id),
}


def messages_sent_by(request: Any) -> int:
    """How many messages a request sends (0 for any other request; a list of requests
    counts each)."""
    if isinstance(request, list | tuple):
        return sum(messages_sent_by(r) for r in request)
    count = _SENDS.get(type(request))
    return count(request) if count is not None else 0


class CountingClient(TelegramClient):  # type: ignore[misc]  # Telethon is untyped
    """A TelegramClient that counts the messages it sent (``messages_sent``): every
    high-level send (``send_message``, ``event.respond``, ...) goes through ``__call__``."""

    messages_sent = 0

    async def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().__call__(request, *args, **kwargs)
        self.messages_sent += messages_sent_by(request)
        return result


#: Telethon's own (pure Python) factorization, the fallback.
_PYTHON_FACTORIZE: Callable[[int], tuple[int, int]] = Factorization.factorize
#: Its tries: each draws afresh, and one in ~50,000 gives (1, pq) for 31-bit primes.
PYTHON_FACTORIZE_TRIES = 10


def _python_factorize(pq: int) -> tuple[int, int]:
    """Telethon's Pollard-Brent, tried again when it gives no factors. Its one batch
    per round finds the cycle mod p and mod q at the same step now and then, and
    returns (1, pq); sent as is, the server refuses the exchange (-404), and the
    client does not retry (the sandbox tests saw it once in ~10 CI runs)."""
    for _ in range(PYTHON_FACTORIZE_TRIES):
        p, q = _PYTHON_FACTORIZE(pq)
        if p > 1 and p * q == pq:
            return (p, q) if p < q else (q, p)
    raise ValueError(f"no two factors of pq {pq} found in {PYTHON_FACTORIZE_TRIES} tries")


def factorize_pq(pq: int) -> tuple[int, int]:
    """The two primes of the server's ``pq`` (smaller first), as Telethon's own gives."""
    try:
        p, q = cryptg.factorize_pq_pair(pq)
    except BaseException as exc:  # a Rust panic (pyo3's PanicException) is no Exception
        if type(exc).__name__ != "PanicException":
            raise
        # It gives up after a fixed number of attempts (seen on tiny products only).
        return _python_factorize(pq)
    if p * q != pq or 1 in (p, q):
        return _python_factorize(pq)
    return (p, q) if p < q else (q, p)


def use_native_factorization() -> None:
    """Telethon factorizes the server's ``pq`` of each new auth key in Python
    (Pollard-Brent): 35 ms median on an idle core, 0.14 s median and 0.9 s worst on
    this busy 2-core host, on the path of every new bot's first connect. cryptg (the
    native helper Telethon already uses for AES when installed) does it in ~1 ms."""
    Factorization.factorize = classmethod(lambda _cls, pq: factorize_pq(pq))


def build_client(config: BotConfig, session: SQLiteSession | StringSession) -> TelegramClient:
    """A client pointed at the configured server (set before any connect)."""
    use_native_factorization()
    health = config.health
    client = CountingClient(
        session,
        config.telegram.api_id,
        config.telegram.api_hash,
        timeout=max(1, round(health.connect_timeout_s)),
        # One attempt per connect: retrying with back-off, and reporting each
        # failure in heartbeats, is the login loop's job.
        connection_retries=0,  # 0 retries: a single attempt
        retry_delay=0,
        flood_sleep_threshold=DEFAULT_FLOOD_SLEEP_S,
        # With the session file's saved update state: a restarted bot gets what
        # was sent to it while it was down (getDifference).
        catch_up=True,
        base_logger="telethon",
    )
    server = config.telegram.server
    if server is not None:
        add_server_key(server.public_key)
        client.session.set_dc(server.dc_id, server.host, server.port)
    return client


def add_server_key(pem: str) -> None:
    """Make Telethon trust the server's PKCS#1 public key ``pem`` (a ValueError if it is
    none; the config's validation refused such a key already).

    What ``telethon.crypto.rsa.add_key`` does, but with the key parsed by our own
    DER reader rather than by ``rsa``'s pyasn1: in a forked bot, running pyasn1's
    decoder copied ~0.5 MB of the fork server's pages (docs/internals.md, Memory).
    """
    key = rsa.PublicKey(*rsa_public_numbers(pem))
    telethon_rsa._server_keys[telethon_rsa._compute_fingerprint(key)] = (key, False)


async def call_reporting_flood(client: TelegramClient, request: Any) -> Any:
    """``client(request)`` but raising FloodWaitError instead of sleeping through it.

    Telethon 1.45's ``__call__`` drops its ``flood_sleep_threshold`` argument,
    so this goes one level down, to the method that honours it.
    """
    return await client._call(client._sender, request, flood_sleep_threshold=0)


def pending_flood_wait_until(client: TelegramClient) -> float | None:
    """When the longest FloodWait Telethon knows of ends (unix s), including the
    short ones it sleeps through silently; None if there is none."""
    waits: object = getattr(client, "_flood_waited_requests", None)
    if not isinstance(waits, dict) or not waits:
        return None
    return max(float(until) for until in waits.values())


class Login:
    """Connect and log in, retrying until Telegram answers or refuses the credentials."""

    def __init__(
        self,
        config: BotConfig,
        client: TelegramClient,
        status: TelegramStatus,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.client = client
        self.status = status
        self._sleep = sleep
        self._timeout = config.health.connect_timeout_s
        server = config.telegram.server
        self._target = "Telegram" if server is None else f"{server.host}:{server.port}"

    async def attempt(self) -> ReadyTelegram:
        """One try: connect, then find out who we are; sign in with the token if need be."""
        client = self.client
        # A FloodWait at login must be reported, not slept through in silence
        # (and past connect_timeout_s). Catch-up handlers may already run and
        # get FloodWaitError instead of a sleep meanwhile; a login is short.
        client.flood_sleep_threshold = 0
        try:
            await asyncio.wait_for(client.connect(), self._timeout)
            me = await self._who_am_i()
        finally:
            client.flood_sleep_threshold = DEFAULT_FLOOD_SLEEP_S
        token = self.config.token
        if token is not None and str(me.id) != token_bot_id(token):
            log.warning(
                "logged in as id %s, but the token is for bot id %s", me.id, token_bot_id(token)
            )
        return ReadyTelegram(connected=True, me_id=int(me.id), me_username=me.username)

    async def _who_am_i(self) -> Any:
        request = functions.users.GetUsersRequest([types.InputUserSelf()])
        try:
            users = await asyncio.wait_for(
                call_reporting_flood(self.client, request), self._timeout
            )
            return users[0]
        except errors.UnauthorizedError:
            if self.config.token is None:
                raise  # a user session cannot log in again by itself
        # A fresh (or logged-out) auth key: log in with the bot token.
        return await asyncio.wait_for(
            self.client.sign_in(bot_token=self.config.token), self._timeout
        )

    async def reset(self) -> None:
        """Drop a half-made connection before the next try."""
        try:
            await asyncio.wait_for(self.client.disconnect(), DISCONNECT_TIMEOUT_S)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("telegram: disconnect after a failed login: %s", describe(exc))

    async def until_logged_in(self) -> ReadyTelegram:
        """Retry ``attempt`` with back-off; raises AuthRejected when the credentials are refused."""
        failures = 0
        while True:
            try:
                me = await self.attempt()
            except TimeoutError:
                outcome: Outcome = Transient(
                    f"TimeoutError: no answer from {self._target} within "
                    f"{self._timeout:g} s (connect_timeout_s)"
                )
            # Whatever Telethon or the network raises is sorted here; only
            # rejected credentials end the loop, the rest is reported and retried.
            except (ConnectionError, OSError) as exc:
                # Telethon words it "Connection to Telegram failed 0 time(s)"; say where.
                outcome = Transient(f"cannot connect to {self._target}: {describe(exc)}")
            except Exception as exc:
                outcome = classify(exc)
            else:
                self.status.mark_connected()
                return me
            if isinstance(outcome, AuthRejected):
                await self.reset()
                raise outcome
            failures += 1
            if isinstance(outcome, FloodWait):
                self.status.note_flood_wait(outcome.seconds)
                delay = outcome.seconds
            else:
                self.status.mark_disconnected(outcome.error)
                delay = retry_delay_s(failures)
            log.warning(
                "telegram: login failed (%s); retrying in %.1f s",
                self.status.last_error,
                delay,
            )
            await self.reset()
            await self._sleep(delay)


def update_state(client: TelegramClient) -> Any:
    """Telethon's current update state (pts and friends), cheap to read and compare."""
    return client._message_box.session_state()


async def save_update_state(client: TelegramClient) -> None:
    """Write the update state to the session now.

    Telethon does this on a clean disconnect and once a minute; a bot killed in
    between would then miss, after its restart, every message it had not saved.
    Private Telethon API (the version is pinned in pyproject.toml).
    """
    await client._save_states_and_entities()
    client.session.save()


def ensure_data_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
