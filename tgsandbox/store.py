"""SQLite persistence of the sandbox: accounts, auth keys, messages and update logs.

Speaks SQL and nothing else; rows come back as frozen dataclasses. Writes commit at
once (WAL, synchronous=NORMAL) so that tokens, keys and pts survive a restart.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AccountKind = Literal["bot", "user"]
UpdateKind = Literal["new", "edit", "delete"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    username TEXT UNIQUE,
    phone TEXT UNIQUE,
    first_name TEXT NOT NULL,
    secret TEXT,
    pts INTEGER NOT NULL DEFAULT 0,
    last_msg_id INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    UNIQUE (kind, name)
);
CREATE TABLE IF NOT EXISTS auth_keys (
    key_id INTEGER PRIMARY KEY,
    key BLOB NOT NULL,
    account_id INTEGER,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    account_id INTEGER NOT NULL,
    id INTEGER NOT NULL,
    peer_id INTEGER NOT NULL,
    out INTEGER NOT NULL,
    text TEXT NOT NULL,
    date INTEGER NOT NULL,
    edit_date INTEGER,
    reply_to INTEGER,
    pair_account INTEGER NOT NULL,
    pair_id INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, id)
);
CREATE TABLE IF NOT EXISTS updates (
    account_id INTEGER NOT NULL,
    pts INTEGER NOT NULL,
    pts_count INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message_ids TEXT NOT NULL,
    PRIMARY KEY (account_id, pts)
);
"""


@dataclass(frozen=True)
class AccountRow:
    id: int
    kind: AccountKind
    name: str
    username: str | None
    phone: str | None
    first_name: str
    secret: str | None
    pts: int
    last_msg_id: int


@dataclass(frozen=True)
class MessageRow:
    """One message as one account's box holds it."""

    account_id: int
    id: int
    peer_id: int
    out: bool
    text: str
    date: int
    edit_date: int | None
    reply_to: int | None
    pair_account: int
    pair_id: int
    deleted: bool


@dataclass(frozen=True)
class UpdateRow:
    account_id: int
    pts: int
    pts_count: int
    kind: UpdateKind
    message_ids: tuple[int, ...]


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Store:
    """The sandbox's SQLite file (``state.db`` in the data dir)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # accounts

    def accounts(self) -> list[AccountRow]:
        rows = self._db.execute(
            "SELECT id, kind, name, username, phone, first_name, secret, pts, last_msg_id "
            "FROM accounts ORDER BY id"
        ).fetchall()
        return [AccountRow(*row) for row in rows]

    def insert_account(self, row: AccountRow, created: float) -> None:
        self._db.execute(
            "INSERT INTO accounts (id, kind, name, username, phone, first_name, secret, pts, "
            "last_msg_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.kind,
                row.name,
                row.username,
                row.phone,
                row.first_name,
                row.secret,
                row.pts,
                row.last_msg_id,
                created,
            ),
        )

    # auth keys

    def auth_keys(self) -> list[tuple[int, bytes, int | None]]:
        rows = self._db.execute("SELECT key_id, key, account_id FROM auth_keys").fetchall()
        return [(key_id % (1 << 64), key, account) for key_id, key, account in rows]

    def put_auth_key(self, key_id: int, key: bytes, account_id: int | None, created: float) -> None:
        self._db.execute(
            "INSERT INTO auth_keys (key_id, key, account_id, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key_id) DO UPDATE SET account_id = excluded.account_id",
            (_signed64(key_id), key, account_id, created),
        )

    # messages and updates (one transaction per change of the world)

    def record(
        self,
        messages: list[MessageRow],
        updates: list[UpdateRow],
        counters: list[tuple[int, int, int]],
    ) -> None:
        """Insert or replace messages, append updates, set (account, pts, last_msg_id)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO messages (account_id, id, peer_id, out, text, date, "
                "edit_date, reply_to, pair_account, pair_id, deleted) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        m.account_id,
                        m.id,
                        m.peer_id,
                        int(m.out),
                        m.text,
                        m.date,
                        m.edit_date,
                        m.reply_to,
                        m.pair_account,
                        m.pair_id,
                        int(m.deleted),
                    )
                    for m in messages
                ],
            )
            self._db.executemany(
                "INSERT INTO updates (account_id, pts, pts_count, kind, message_ids) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (u.account_id, u.pts, u.pts_count, u.kind, json.dumps(list(u.message_ids)))
                    for u in updates
                ],
            )
            self._db.executemany(
                "UPDATE accounts SET pts = ?, last_msg_id = ? WHERE id = ?",
                [(pts, last, account) for account, pts, last in counters],
            )

    def message(self, account_id: int, msg_id: int) -> MessageRow | None:
        row = self._db.execute(
            "SELECT account_id, id, peer_id, out, text, date, edit_date, reply_to, pair_account, "
            "pair_id, deleted FROM messages WHERE account_id = ? AND id = ?",
            (account_id, msg_id),
        ).fetchone()
        return _message(row) if row else None

    def messages(
        self,
        account_id: int,
        *,
        peer_id: int | None = None,
        after_id: int = 0,
        before_id: int | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[MessageRow]:
        sql = (
            "SELECT account_id, id, peer_id, out, text, date, edit_date, reply_to, pair_account, "
            "pair_id, deleted FROM messages WHERE account_id = ? AND deleted = 0 AND id > ?"
        )
        args: list[int] = [account_id, after_id]
        if peer_id is not None:
            sql += " AND peer_id = ?"
            args.append(peer_id)
        if before_id is not None:
            sql += " AND id < ?"
            args.append(before_id)
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        sql += " LIMIT ?"
        args.append(limit)
        return [_message(row) for row in self._db.execute(sql, args).fetchall()]

    def updates_after(self, account_id: int, pts: int, limit: int) -> list[UpdateRow]:
        rows = self._db.execute(
            "SELECT account_id, pts, pts_count, kind, message_ids FROM updates "
            "WHERE account_id = ? AND pts > ? ORDER BY pts LIMIT ?",
            (account_id, pts, limit),
        ).fetchall()
        return [UpdateRow(a, p, c, k, tuple(json.loads(ids))) for a, p, c, k, ids in rows]


def _message(row: tuple[object, ...]) -> MessageRow:
    (account, msg_id, peer, out, text, date, edit_date, reply_to, pair_a, pair_i, deleted) = row
    return MessageRow(
        account_id=int(account),  # type: ignore[call-overload]
        id=int(msg_id),  # type: ignore[call-overload]
        peer_id=int(peer),  # type: ignore[call-overload]
        out=bool(out),
        text=str(text),
        date=int(date),  # type: ignore[call-overload]
        edit_date=None if edit_date is None else int(edit_date),  # type: ignore[call-overload]
        reply_to=None if reply_to is None else int(reply_to),  # type: ignore[call-overload]
        pair_account=int(pair_a),  # type: ignore[call-overload]
        pair_id=int(pair_i),  # type: ignore[call-overload]
        deleted=bool(deleted),
    )
