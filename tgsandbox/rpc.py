"""Telegram API methods of the sandbox: decoded request in, result object or RpcFailure out.

Requests and results are Telethon's own TL classes, so the layer always matches the
installed Telethon. Only what a Telethon bot or a person's client needs is simulated;
any other method answers a proper ``rpc_error``.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from telethon.tl import functions, types

from .faults import Effect
from .store import MessageRow, UpdateRow
from .world import (
    Account,
    AccountNotFound,
    MessageRejected,
    World,
    login_code_for,
)

DC_ID = 2
DIFFERENCE_LIMIT = 1000
RANDOM_ID_MEMORY = 100_000
USERNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{3,31}$")

# Wrappers whose ``query`` is the real request.
WRAPPERS = (
    functions.InvokeWithLayerRequest,
    functions.InitConnectionRequest,
    functions.InvokeWithoutUpdatesRequest,
    functions.InvokeAfterMsgRequest,
    functions.InvokeAfterMsgsRequest,
    functions.InvokeWithTakeoutRequest,
    functions.InvokeWithMessagesRangeRequest,
)


class RpcFailure(Exception):
    """The rpc_error to answer: Telegram's code and message (e.g. 420 FLOOD_WAIT_30)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class RefuseConnection(Exception):
    """Close the caller's connection without an answer (fault refuse, known only at login)."""


def unwrap(request: Any) -> Any:
    """The request inside invokeWithLayer / initConnection / invokeAfterMsg wrappers."""
    while isinstance(request, WRAPPERS):
        request = request.query
    return request


@dataclass(frozen=True)
class Call:
    """Who is calling: the auth key, the account bound to it (if any), its fault effect."""

    key_id: int
    account_id: int | None
    effect: Effect


def _date(ts: int | float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC)


Handler = Callable[["Methods", Call, Any], Any]
_HANDLERS: dict[type, Handler] = {}
_NEEDS_AUTH: set[type] = set()


def method(request_type: type, *, auth: bool = True) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _HANDLERS[request_type] = handler
        if auth:
            _NEEDS_AUTH.add(request_type)
        return handler

    return register


class Methods:
    """The method table of the sandbox over one :class:`World`."""

    def __init__(
        self, world: World, *, host: str, port: int, effect_of: Callable[[int], Effect]
    ) -> None:
        self.world = world
        self._effect_of = effect_of
        self.host = host
        self.port = port
        self._sent: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._code_secret = hashlib.sha256(b"tgfleet-sandbox-phone-code").digest()

    def call(self, call: Call, request: Any) -> Any:
        """Answer one (unwrapped) request, or raise RpcFailure."""
        handler = _HANDLERS.get(type(request))
        if handler is None:
            raise RpcFailure(400, "METHOD_INVALID")
        if type(request) in _NEEDS_AUTH:
            self.me(call)
        try:
            return handler(self, call, request)
        except MessageRejected as exc:
            raise RpcFailure(400, exc.rpc_error) from None

    # helpers shared by handlers

    def world_effect(self, account_id: int) -> Effect:
        return self._effect_of(account_id)

    def me(self, call: Call) -> Account:
        if call.account_id is None:
            raise RpcFailure(401, "AUTH_KEY_UNREGISTERED")
        account = self.world.find_account(call.account_id)
        if account is None:
            raise RpcFailure(401, "AUTH_KEY_UNREGISTERED")
        if call.effect.revoked:
            if account.is_bot:
                raise RpcFailure(401, "AUTH_KEY_UNREGISTERED")
            raise RpcFailure(401, "USER_DEACTIVATED")
        return account

    def user(self, account: Account, viewer_id: int) -> types.User:
        is_self = account.id == viewer_id
        return types.User(
            id=account.id,
            is_self=is_self or None,
            bot=account.is_bot or None,
            bot_nochats=account.is_bot or None,
            access_hash=self.world.access_hash(account.id),
            first_name=account.first_name,
            username=account.username,
            phone=account.phone if is_self else None,
            bot_info_version=1 if account.is_bot else None,
            status=None if account.is_bot else types.UserStatusRecently(),
        )

    def message(self, row: MessageRow) -> types.Message:
        sender = row.account_id if row.out else row.peer_id
        return types.Message(
            id=row.id,
            peer_id=types.PeerUser(row.peer_id),
            date=_date(row.date),
            message=row.text,
            out=row.out or None,
            from_id=types.PeerUser(sender),
            reply_to=(
                types.MessageReplyHeader(reply_to_msg_id=row.reply_to)
                if row.reply_to is not None
                else None
            ),
            edit_date=None if row.edit_date is None else _date(row.edit_date),
        )

    def users_of(self, viewer: Account, rows: list[MessageRow]) -> list[types.User]:
        ids = {viewer.id} | {r.peer_id for r in rows}
        return [self.user(self.world.account(i), viewer.id) for i in sorted(ids)]

    def peer_account(self, peer: Any, me: Account) -> Account:
        """The account an InputPeer / InputUser names (access hashes are not enforced)."""
        if isinstance(peer, types.InputPeerSelf | types.InputUserSelf):
            return me
        user_id = getattr(peer, "user_id", None)
        if not isinstance(
            peer,
            types.InputPeerUser
            | types.InputUser
            | types.InputPeerUserFromMessage
            | types.InputUserFromMessage,
        ) or not isinstance(user_id, int):
            raise RpcFailure(400, "PEER_ID_INVALID")
        account = self.world.find_account(user_id)
        if account is None:
            raise RpcFailure(400, "PEER_ID_INVALID")
        return account

    def updates_of(self, viewer: Account, rows: list[UpdateRow]) -> types.Updates:
        """An ``updates`` push carrying the given pts updates of ``viewer``."""
        updates: list[Any] = []
        messages: list[MessageRow] = []
        for row in rows:
            update, shown = self.update_object(row)
            updates.append(update)
            messages.extend(shown)
        return types.Updates(
            updates=updates,
            users=self.users_of(viewer, messages),
            chats=[],
            date=_date(time.time()),
            seq=0,
        )

    def update_object(self, row: UpdateRow) -> tuple[Any, list[MessageRow]]:
        if row.kind == "delete":
            return types.UpdateDeleteMessages(list(row.message_ids), row.pts, row.pts_count), []
        stored = self.world.message(row.account_id, row.message_ids[0])
        if stored is None:
            raise RpcFailure(500, "INTERNAL")
        message = self.message(stored)
        if row.kind == "new":
            return types.UpdateNewMessage(message, row.pts, row.pts_count), [stored]
        return types.UpdateEditMessage(message, row.pts, row.pts_count), [stored]

    def remember_sent(self, key: tuple[int, int], result: Any) -> None:
        self._sent[key] = result
        while len(self._sent) > RANDOM_ID_MEMORY:
            self._sent.popitem(last=False)

    def code_hash(self, phone: str) -> str:
        return hmac.new(self._code_secret, phone.encode(), "sha256").hexdigest()[:18]


# help


@method(functions.help.GetConfigRequest, auth=False)
def _get_config(m: Methods, call: Call, request: Any) -> types.Config:
    now = time.time()
    return types.Config(
        date=_date(now),
        expires=_date(now + 3600),
        test_mode=False,
        this_dc=DC_ID,
        dc_options=[types.DcOption(id=DC_ID, ip_address=m.host, port=m.port)],
        dc_txt_domain_name="sandbox.invalid",
        chat_size_max=200,
        megagroup_size_max=200_000,
        forwarded_count_max=100,
        online_update_period_ms=210_000,
        offline_blur_timeout_ms=5_000,
        offline_idle_timeout_ms=30_000,
        online_cloud_timeout_ms=300_000,
        notify_cloud_delay_ms=30_000,
        notify_default_delay_ms=1_500,
        push_chat_period_ms=60_000,
        push_chat_limit=2,
        edit_time_limit=172_800,
        revoke_time_limit=2_147_483_647,
        revoke_pm_time_limit=2_147_483_647,
        rating_e_decay=2_419_200,
        stickers_recent_limit=200,
        channels_read_media_period=604_800,
        call_receive_timeout_ms=20_000,
        call_ring_timeout_ms=90_000,
        call_connect_timeout_ms=30_000,
        call_packet_timeout_ms=10_000,
        me_url_prefix="https://t.me/",
        caption_length_max=1024,
        message_length_max=4096,
        webfile_dc_id=DC_ID,
    )


@method(functions.help.GetNearestDcRequest, auth=False)
def _nearest_dc(m: Methods, call: Call, request: Any) -> types.NearestDc:
    return types.NearestDc(country="ZZ", this_dc=DC_ID, nearest_dc=DC_ID)


# auth


@method(functions.auth.ImportBotAuthorizationRequest, auth=False)
def _import_bot(m: Methods, call: Call, request: Any) -> types.auth.Authorization:
    try:
        bot = m.world.bot_by_token(request.bot_auth_token)
    except AccountNotFound:
        raise RpcFailure(400, "ACCESS_TOKEN_INVALID") from None
    effect = m.world_effect(bot.id)
    if effect.refuse:
        raise RefuseConnection(f"refused (fault refuse on bot {bot.name})")
    if call.effect.revoked or effect.revoked:
        raise RpcFailure(400, "ACCESS_TOKEN_EXPIRED")
    m.world.bind_auth_key(call.key_id, bot.id)
    return types.auth.Authorization(user=m.user(bot, bot.id))


@method(functions.auth.SendCodeRequest, auth=False)
def _send_code(m: Methods, call: Call, request: Any) -> types.auth.SentCode:
    phone = re.sub(r"\D", "", request.phone_number)
    if login_code_for(phone) is None:
        raise RpcFailure(400, "PHONE_NUMBER_INVALID")
    return types.auth.SentCode(
        type=types.auth.SentCodeTypeApp(length=5), phone_code_hash=m.code_hash(phone)
    )


@method(functions.auth.SignInRequest, auth=False)
def _sign_in(m: Methods, call: Call, request: Any) -> types.auth.Authorization:
    phone = re.sub(r"\D", "", request.phone_number)
    expected = login_code_for(phone)
    if expected is None:
        raise RpcFailure(400, "PHONE_NUMBER_INVALID")
    if not hmac.compare_digest(request.phone_code_hash, m.code_hash(phone)):
        raise RpcFailure(
            400, "PHONE_CODE_HASH_EMPTY" if not request.phone_code_hash else "PHONE_CODE_EXPIRED"
        )
    if not request.phone_code:
        raise RpcFailure(400, "PHONE_CODE_EMPTY")
    if request.phone_code != expected:
        raise RpcFailure(400, "PHONE_CODE_INVALID")
    user = m.world.user_by_phone(phone)
    if m.world_effect(user.id).revoked:
        raise RpcFailure(400, "PHONE_NUMBER_BANNED")
    m.world.bind_auth_key(call.key_id, user.id)
    return types.auth.Authorization(user=m.user(user, user.id))


@method(functions.auth.LogOutRequest)
def _log_out(m: Methods, call: Call, request: Any) -> types.auth.LoggedOut:
    m.world.bind_auth_key(call.key_id, None)
    return types.auth.LoggedOut()


# users and contacts


@method(functions.users.GetUsersRequest)
def _get_users(m: Methods, call: Call, request: Any) -> list[types.User]:
    me = m.me(call)
    found: list[types.User] = []
    for wanted in request.id:
        try:
            found.append(m.user(m.peer_account(wanted, me), me.id))
        except RpcFailure:
            continue  # Telegram leaves out users it cannot find
    return found


@method(functions.users.GetFullUserRequest)
def _get_full_user(m: Methods, call: Call, request: Any) -> types.users.UserFull:
    me = m.me(call)
    target = m.peer_account(request.id, me)
    return types.users.UserFull(
        full_user=types.UserFull(
            id=target.id,
            settings=types.PeerSettings(),
            notify_settings=types.PeerNotifySettings(),
            common_chats_count=0,
            about=f"sandbox {'bot' if target.is_bot else 'user'} {target.name}",
            bot_info=(
                types.BotInfo(user_id=target.id, description="", commands=[])
                if target.is_bot
                else None
            ),
        ),
        chats=[],
        users=[m.user(target, me.id)],
    )


@method(functions.contacts.ResolveUsernameRequest)
def _resolve_username(m: Methods, call: Call, request: Any) -> types.contacts.ResolvedPeer:
    me = m.me(call)
    if not USERNAME_RE.match(request.username or ""):
        raise RpcFailure(400, "USERNAME_INVALID")
    try:
        target = m.world.by_username(request.username)
    except AccountNotFound:
        raise RpcFailure(400, "USERNAME_NOT_OCCUPIED") from None
    return types.contacts.ResolvedPeer(
        peer=types.PeerUser(target.id), chats=[], users=[m.user(target, me.id)]
    )


@method(functions.account.UpdateStatusRequest)
def _update_status(m: Methods, call: Call, request: Any) -> bool:
    return True


# updates


@method(functions.updates.GetStateRequest)
def _get_state(m: Methods, call: Call, request: Any) -> types.updates.State:
    me = m.me(call)
    return types.updates.State(
        pts=m.world.pts(me.id), qts=0, date=_date(time.time()), seq=0, unread_count=0
    )


@method(functions.updates.GetDifferenceRequest)
def _get_difference(m: Methods, call: Call, request: Any) -> Any:
    me = m.me(call)
    current = m.world.pts(me.id)
    now = _date(time.time())
    if request.pts == current:
        return types.updates.DifferenceEmpty(date=now, seq=0)
    if request.pts > current or request.pts < 0:
        return types.updates.DifferenceTooLong(pts=current)
    limit = min(request.pts_total_limit or DIFFERENCE_LIMIT, DIFFERENCE_LIMIT)
    rows = m.world.updates_after(me.id, request.pts, limit)
    new_messages: list[Any] = []
    other: list[Any] = []
    shown: list[MessageRow] = []
    for row in rows:
        update, messages = m.update_object(row)
        shown.extend(messages)
        if isinstance(update, types.UpdateNewMessage):
            new_messages.append(update.message)
        else:
            other.append(update)
    last = rows[-1].pts if rows else current
    state = types.updates.State(pts=last, qts=0, date=now, seq=0, unread_count=0)
    users = m.users_of(me, shown)
    if last < current:
        return types.updates.DifferenceSlice(
            new_messages=new_messages,
            new_encrypted_messages=[],
            other_updates=other,
            chats=[],
            users=users,
            intermediate_state=state,
        )
    return types.updates.Difference(
        new_messages=new_messages,
        new_encrypted_messages=[],
        other_updates=other,
        chats=[],
        users=users,
        state=state,
    )


# messages


@method(functions.messages.SendMessageRequest)
def _send_message(m: Methods, call: Call, request: Any) -> Any:
    me = m.me(call)
    if call.effect.flood_s is not None:
        raise RpcFailure(420, f"FLOOD_WAIT_{call.effect.flood_s}")
    dedup = (me.id, request.random_id)
    if dedup in m._sent:
        return m._sent[dedup]
    target = m.peer_account(request.peer, me)
    reply_to = getattr(request.reply_to, "reply_to_msg_id", None)
    row, pts = m.world.send(me.id, target.id, request.message, reply_to)
    result = types.UpdateShortSentMessage(
        id=row.id, pts=pts, pts_count=1, date=_date(row.date), out=True
    )
    m.remember_sent(dedup, result)
    return result


@method(functions.messages.EditMessageRequest)
def _edit_message(m: Methods, call: Call, request: Any) -> types.Updates:
    me = m.me(call)
    m.peer_account(request.peer, me)
    if request.message is None:
        raise RpcFailure(400, "MESSAGE_NOT_MODIFIED")
    row, pts = m.world.edit(me.id, request.id, request.message)
    return types.Updates(
        updates=[types.UpdateEditMessage(m.message(row), pts, 1)],
        users=m.users_of(me, [row]),
        chats=[],
        date=_date(time.time()),
        seq=0,
    )


@method(functions.messages.DeleteMessagesRequest)
def _delete_messages(m: Methods, call: Call, request: Any) -> types.messages.AffectedMessages:
    me = m.me(call)
    pts, count = m.world.delete(me.id, list(request.id), revoke=bool(request.revoke))
    return types.messages.AffectedMessages(pts=pts, pts_count=count)


@method(functions.messages.SetTypingRequest)
def _set_typing(m: Methods, call: Call, request: Any) -> bool:
    me = m.me(call)
    m.peer_account(request.peer, me)
    return True


@method(functions.messages.ReadHistoryRequest)
def _read_history(m: Methods, call: Call, request: Any) -> types.messages.AffectedMessages:
    me = m.me(call)
    m.peer_account(request.peer, me)
    return types.messages.AffectedMessages(pts=m.world.pts(me.id), pts_count=0)


@method(functions.messages.GetMessagesRequest)
def _get_messages(m: Methods, call: Call, request: Any) -> types.messages.Messages:
    me = m.me(call)
    rows: list[MessageRow] = []
    for wanted in request.id:
        msg_id = getattr(wanted, "id", None)
        if isinstance(msg_id, int):
            row = m.world.message(me.id, msg_id)
            if row is not None and not row.deleted:
                rows.append(row)
    return types.messages.Messages(
        messages=[m.message(r) for r in rows], topics=[], chats=[], users=m.users_of(me, rows)
    )


@method(functions.messages.GetHistoryRequest)
def _get_history(m: Methods, call: Call, request: Any) -> types.messages.Messages:
    me = m.me(call)
    if me.is_bot:
        raise RpcFailure(400, "BOT_METHOD_INVALID")
    peer = m.peer_account(request.peer, me)
    rows = m.world.messages(
        me.id,
        peer_id=peer.id,
        after_id=max(request.min_id, 0),
        before_id=request.offset_id or None,
        limit=max(1, min(request.limit or 100, 100)),
        newest_first=True,
    )
    return types.messages.Messages(
        messages=[m.message(r) for r in rows], topics=[], chats=[], users=m.users_of(me, rows)
    )
