"""The sandbox's world: accounts (bots and users), auth keys, private messages and pts.

Every account has its own message box (ids 1, 2, …) and its own update sequence
(pts), as on Telegram: a private message lands in both the sender's box (out) and
the recipient's box, each with its own id and pts. Listeners hear about every new
update after it has been committed, so the server can push it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .crypto import AuthKey
from .store import AccountKind, AccountRow, MessageRow, Store, UpdateRow

FIRST_ACCOUNT_ID = 1_000_001
MAX_MESSAGE_LENGTH = 4096
BOT_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,27}$")
USER_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# Test-DC phone numbers: 99966 X YYYY, X the DC number; the code is X five times.
TEST_PHONE_RE = re.compile(r"^99966([1-5])(\d{4})$")

UpdateListener = Callable[[int, list[UpdateRow]], None]


# Telethon reads a saved pts of 0 as "no update state yet" and skips getDifference,
# so a bot that never received anything would miss what came while it was down.
INITIAL_PTS = 1


class WorldError(Exception):
    """Base of the world's precise errors."""


class InvalidName(WorldError):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field


class NameTaken(WorldError):
    """An account of that kind and name exists already."""


class AccountNotFound(WorldError):
    """No account by that id, name, username or token."""


class MessageRejected(WorldError):
    """Telegram would refuse this message; ``rpc_error`` is the error it would name."""

    def __init__(self, rpc_error: str) -> None:
        super().__init__(rpc_error)
        self.rpc_error = rpc_error


@dataclass(frozen=True)
class Account:
    id: int
    kind: AccountKind
    name: str
    username: str | None
    phone: str | None
    first_name: str
    secret: str | None

    @property
    def is_bot(self) -> bool:
        return self.kind == "bot"

    @property
    def token(self) -> str | None:
        return None if self.secret is None else f"{self.id}:{self.secret}"


def bot_username(name: str) -> str:
    """The username of bot ``name``: ``NAME_bot`` ('-' becomes '_', as usernames allow)."""
    return f"{name.replace('-', '_')}_bot"


def check_text(text: str) -> None:
    """Raise MessageRejected as Telegram would for an empty or too long message."""
    if not text.strip():
        raise MessageRejected("MESSAGE_EMPTY")
    if len(text) > MAX_MESSAGE_LENGTH:
        raise MessageRejected("MESSAGE_TOO_LONG")


def login_code_for(phone: str) -> str | None:
    """The login code of a test-DC phone number, or None if it is not one."""
    match = TEST_PHONE_RE.match(phone)
    return None if match is None else match.group(1) * 5


class World:
    """Accounts, keys, messages and updates, backed by a :class:`Store`."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._accounts: dict[int, Account] = {}
        self._pts: dict[int, int] = {}
        self._last_msg: dict[int, int] = {}
        self._by_name: dict[tuple[str, str], int] = {}
        self._by_username: dict[str, int] = {}
        self._by_phone: dict[str, int] = {}
        self._keys: dict[int, AuthKey] = {}
        self._key_account: dict[int, int | None] = {}
        self._listeners: list[UpdateListener] = []
        for row in store.accounts():
            self._index(_account(row))
            self._pts[row.id] = row.pts
            self._last_msg[row.id] = row.last_msg_id
        for key_id, key, account_id in store.auth_keys():
            self._keys[key_id] = AuthKey(key)
            self._key_account[key_id] = account_id
        # Access hashes need only be stable across restarts here, not secret.
        self._hash_secret = hashlib.sha256(b"tgfleet-sandbox-access-hash").digest()

    # listeners

    def subscribe(self, listener: UpdateListener) -> None:
        self._listeners.append(listener)

    def _notify(self, account_id: int, updates: list[UpdateRow]) -> None:
        for listener in list(self._listeners):
            listener(account_id, updates)

    # accounts

    def _index(self, account: Account) -> None:
        self._accounts[account.id] = account
        self._by_name[(account.kind, account.name)] = account.id
        if account.username:
            self._by_username[account.username.lower()] = account.id
        if account.phone:
            self._by_phone[account.phone] = account.id

    def _new_account(self, account: Account) -> Account:
        row = AccountRow(
            id=account.id,
            kind=account.kind,
            name=account.name,
            username=account.username,
            phone=account.phone,
            first_name=account.first_name,
            secret=account.secret,
            pts=INITIAL_PTS,
            last_msg_id=0,
        )
        self._store.insert_account(row, self._clock())
        self._index(account)
        self._pts[account.id] = INITIAL_PTS
        self._last_msg[account.id] = 0
        return account

    def _next_id(self) -> int:
        return max(self._accounts, default=FIRST_ACCOUNT_ID - 1) + 1

    def create_bot(self, name: str) -> Account:
        if not BOT_NAME_RE.match(name):
            raise InvalidName(
                "name", "a bot name is 1-28 of a-z, 0-9, '_', '-', starting with a letter"
            )
        if ("bot", name) in self._by_name or bot_username(name).lower() in self._by_username:
            raise NameTaken(f"a bot named {name!r} exists already")
        return self._new_account(
            Account(
                id=self._next_id(),
                kind="bot",
                name=name,
                username=bot_username(name),
                phone=None,
                first_name=name,
                secret=secrets.token_urlsafe(27),
            )
        )

    def user(self, name: str, *, create: bool) -> Account:
        """A simulated user by name (created on first use when ``create``)."""
        found = self._by_name.get(("user", name))
        if found is not None:
            return self._accounts[found]
        if not USER_NAME_RE.match(name):
            raise InvalidName(
                "user", "a user name is 1-32 of a-z, 0-9, '_', '-', starting with a letter"
            )
        if not create:
            raise AccountNotFound(f"no user named {name!r}")
        return self._new_account(
            Account(
                id=self._next_id(),
                kind="user",
                name=name,
                username=None,
                phone=None,
                first_name=name,
                secret=None,
            )
        )

    def user_by_phone(self, phone: str) -> Account:
        """The account of a test phone number, registered on first sign-in."""
        found = self._by_phone.get(phone)
        if found is not None:
            return self._accounts[found]
        return self._new_account(
            Account(
                id=self._next_id(),
                kind="user",
                name=phone,
                username=None,
                phone=phone,
                first_name=f"Test {phone[-4:]}",
                secret=None,
            )
        )

    def user_by_phone_if_known(self, phone: str) -> Account:
        found = self._by_phone.get(phone)
        if found is None:
            raise AccountNotFound(f"no user with phone {phone}")
        return self._accounts[found]

    def bots(self) -> list[Account]:
        return [a for a in self._accounts.values() if a.is_bot]

    def bot(self, name: str) -> Account:
        found = self._by_name.get(("bot", name))
        if found is None:
            found = self._by_username.get(name.lower())
            if found is None or not self._accounts[found].is_bot:
                raise AccountNotFound(f"no bot named {name!r}")
        return self._accounts[found]

    def account(self, account_id: int) -> Account:
        try:
            return self._accounts[account_id]
        except KeyError:
            raise AccountNotFound(f"no account with id {account_id}") from None

    def find_account(self, account_id: int) -> Account | None:
        return self._accounts.get(account_id)

    def by_username(self, username: str) -> Account:
        found = self._by_username.get(username.lower().lstrip("@"))
        if found is None:
            raise AccountNotFound(f"no account with username {username!r}")
        return self._accounts[found]

    def bot_by_token(self, token: str) -> Account:
        bot_id, sep, secret = token.partition(":")
        if not sep or not bot_id.isdigit():
            raise AccountNotFound("malformed bot token")
        account = self._accounts.get(int(bot_id))
        if account is None or account.secret is None:
            raise AccountNotFound("no bot with that token")
        if not hmac.compare_digest(account.secret.encode(), secret.encode()):
            raise AccountNotFound("no bot with that token")
        return account

    def access_hash(self, account_id: int) -> int:
        digest = hmac.new(self._hash_secret, account_id.to_bytes(8, "little"), "sha256")
        return int.from_bytes(digest.digest()[:8], "little", signed=True)

    def pts(self, account_id: int) -> int:
        return self._pts[account_id]

    # auth keys

    def auth_key(self, key_id: int) -> AuthKey | None:
        return self._keys.get(key_id)

    def key_account(self, key_id: int) -> int | None:
        return self._key_account.get(key_id)

    def add_auth_key(self, key: AuthKey) -> None:
        self._keys[key.key_id] = key
        self._key_account[key.key_id] = None
        self._store.put_auth_key(key.key_id, key.key, None, self._clock())

    def bind_auth_key(self, key_id: int, account_id: int | None) -> None:
        key = self._keys[key_id]
        self._key_account[key_id] = account_id
        self._store.put_auth_key(key_id, key.key, account_id, self._clock())

    # messages

    def send(
        self, sender_id: int, recipient_id: int, text: str, reply_to: int | None = None
    ) -> tuple[MessageRow, int]:
        """Deliver a private message; returns the sender's copy and the sender's new pts."""
        sender, recipient = self.account(sender_id), self.account(recipient_id)
        check_text(text)
        if sender.is_bot and recipient.is_bot:
            raise MessageRejected("USER_IS_BOT")
        if sender.id == recipient.id:
            raise MessageRejected("PEER_ID_INVALID")
        now = int(self._clock())
        out_id = self._last_msg[sender.id] + 1
        in_id = self._last_msg[recipient.id] + 1
        in_reply_to = None
        if reply_to is not None:
            original = self._store.message(sender.id, reply_to)
            if original is not None and original.pair_account == recipient.id:
                in_reply_to = original.pair_id
        out_copy = MessageRow(
            sender.id,
            out_id,
            recipient.id,
            True,
            text,
            now,
            None,
            reply_to,
            recipient.id,
            in_id,
            False,
        )
        in_copy = MessageRow(
            recipient.id,
            in_id,
            sender.id,
            False,
            text,
            now,
            None,
            in_reply_to,
            sender.id,
            out_id,
            False,
        )
        out_update = UpdateRow(sender.id, self._pts[sender.id] + 1, 1, "new", (out_id,))
        in_update = UpdateRow(recipient.id, self._pts[recipient.id] + 1, 1, "new", (in_id,))
        self._store.record(
            [out_copy, in_copy],
            [out_update, in_update],
            [(sender.id, out_update.pts, out_id), (recipient.id, in_update.pts, in_id)],
        )
        self._pts[sender.id], self._last_msg[sender.id] = out_update.pts, out_id
        self._pts[recipient.id], self._last_msg[recipient.id] = in_update.pts, in_id
        self._notify(sender.id, [out_update])
        self._notify(recipient.id, [in_update])
        return out_copy, out_update.pts

    def edit(self, account_id: int, msg_id: int, text: str) -> tuple[MessageRow, int]:
        """Edit an own message in both boxes; returns the editor's copy and new pts."""
        own = self._store.message(account_id, msg_id)
        if own is None or own.deleted:
            raise MessageRejected("MESSAGE_ID_INVALID")
        if not own.out:
            raise MessageRejected("MESSAGE_AUTHOR_REQUIRED")
        check_text(text)
        if text == own.text:
            raise MessageRejected("MESSAGE_NOT_MODIFIED")
        now = int(self._clock())
        copies = [replace(own, text=text, edit_date=now)]
        other = self._store.message(own.pair_account, own.pair_id)
        if other is not None and not other.deleted:
            copies.append(replace(other, text=text, edit_date=now))
        updates = [
            UpdateRow(c.account_id, self._pts[c.account_id] + 1, 1, "edit", (c.id,)) for c in copies
        ]
        self._store.record(
            copies, updates, [(u.account_id, u.pts, self._last_msg[u.account_id]) for u in updates]
        )
        for update in updates:
            self._pts[update.account_id] = update.pts
            self._notify(update.account_id, [update])
        return copies[0], updates[0].pts

    def delete(self, account_id: int, msg_ids: list[int], *, revoke: bool) -> tuple[int, int]:
        """Delete messages from the box (and the peer's when ``revoke``): (pts, pts_count)."""
        by_account: dict[int, list[MessageRow]] = {}
        for msg_id in msg_ids:
            own = self._store.message(account_id, msg_id)
            if own is None or own.deleted:
                continue
            by_account.setdefault(account_id, []).append(replace(own, deleted=True))
            if revoke:
                other = self._store.message(own.pair_account, own.pair_id)
                if other is not None and not other.deleted:
                    by_account.setdefault(other.account_id, []).append(replace(other, deleted=True))
        if not by_account:
            return self._pts[account_id], 0
        updates = [
            UpdateRow(
                acc, self._pts[acc] + len(rows), len(rows), "delete", tuple(r.id for r in rows)
            )
            for acc, rows in by_account.items()
        ]
        self._store.record(
            [row for rows in by_account.values() for row in rows],
            updates,
            [(u.account_id, u.pts, self._last_msg[u.account_id]) for u in updates],
        )
        for update in updates:
            self._pts[update.account_id] = update.pts
            self._notify(update.account_id, [update])
        mine = next(u for u in updates if u.account_id == account_id)
        return mine.pts, mine.pts_count

    def message(self, account_id: int, msg_id: int) -> MessageRow | None:
        return self._store.message(account_id, msg_id)

    def messages(self, account_id: int, **query: int | bool | None) -> list[MessageRow]:
        return self._store.messages(account_id, **query)  # type: ignore[arg-type]

    def updates_after(self, account_id: int, pts: int, limit: int) -> list[UpdateRow]:
        return self._store.updates_after(account_id, pts, limit)


def _account(row: AccountRow) -> Account:
    return Account(
        id=row.id,
        kind=row.kind,
        name=row.name,
        username=row.username,
        phone=row.phone,
        first_name=row.first_name,
        secret=row.secret,
    )
