"""The sandbox's MTProto TCP server: connections, sessions, update pushes and faults.

One :class:`Connection` per TCP client: it detects the transport, runs the auth key
exchange, decrypts messages, answers them through :class:`~.rpc.Methods`, and pushes
updates of its account. Each bad input closes (or answers) only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from telethon.errors import TypeNotFoundError
from telethon.extensions import BinaryReader
from telethon.tl import functions, types
from telethon.tl.tlobject import TLObject, TLRequest

from . import envelope
from .crypto import AuthKey, ServerKey
from .envelope import EnvelopeError, Item, MsgIdClock
from .faults import ALL, Effect, Fault, FaultBoard, FaultKind
from .handshake import Handshake, HandshakeError
from .rpc import Call, Methods, RefuseConnection, RpcFailure, unwrap
from .store import Store, UpdateRow
from .transport import Codec, FrameError, detect, transport_error
from .world import World

log = logging.getLogger("tgfleet.sandbox")

MSG_TOO_OLD_S = 300
MSG_TOO_NEW_S = 30
PUSH_LIMIT = 100
MAX_PUSHED_REMEMBERED = 1000


@dataclass(frozen=True)
class ServerConfig:
    """Where the sandbox listens and keeps its data, and its limits."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8711
    advertise_host: str | None = None
    max_frame_bytes: int = 1 << 20
    first_packet_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    write_timeout_s: float = 30.0


class CloseConnection(Exception):
    """Stop serving this connection; ``reason`` is logged, ``error`` sent first if set."""

    def __init__(self, reason: str, error: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


@dataclass
class KeyState:
    """Per auth key: the pts the client is known to have (acked pushes, state results)."""

    acked_pts: int


def serialize_result(result: Any) -> bytes:
    if result is True:
        return struct.pack("<I", envelope.BOOL_TRUE)
    if result is False:
        return struct.pack("<I", envelope.BOOL_FALSE)
    if isinstance(result, list):
        return struct.pack("<Ii", envelope.VECTOR, len(result)) + b"".join(bytes(r) for r in result)
    return bytes(result)


class Connection:
    """One client TCP connection."""

    def __init__(
        self,
        server: SandboxServer,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.id = conn_id
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._codec: Codec | None = None
        self._handshake: Handshake | None = None
        self.key: AuthKey | None = None
        self.session_id: int | None = None
        self._salt = int.from_bytes(os.urandom(8), "little", signed=True)
        self._clock = MsgIdClock()
        self._seq = 0
        self.admitted = False
        self.updates_enabled = False
        self._pushed: dict[int, int] = {}
        self._idle_timeout = server.config.idle_timeout_s
        self._out: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self.closing = False
        # Targets whose live blackhole silenced this connection (until it closes or a clear).
        self.blackholed_by: set[str | int] = set()

    @property
    def account_id(self) -> int | None:
        if self.key is None:
            return None
        return self.server.world.key_account(self.key.key_id)

    def effect(self) -> Effect:
        effect = self.server.faults.effect(self.account_id)
        if self.blackholed_by and not effect.blackhole:
            return replace(effect, blackhole=True)
        return effect

    def describe(self) -> str:
        account = self.account_id
        who = f" account {account}" if account is not None else ""
        return f"conn {self.id} from {self.peer}{who}"

    # life

    async def run(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop())
        reason = "closed by the client"
        try:
            if self.server.faults.effect(None).refuse:
                raise CloseConnection("refused (fault refuse on all)")
            self._codec = await asyncio.wait_for(
                detect(self._reader, self.server.config.max_frame_bytes),
                self.server.config.first_packet_timeout_s,
            )
            timeout = self.server.config.first_packet_timeout_s
            while not self.closing:
                packet = await asyncio.wait_for(self._codec.read_packet(self._reader), timeout)
                timeout = self._idle_timeout
                self._handle(packet)
            reason = "closed by the sandbox"
        except CloseConnection as exc:
            reason = exc.reason
            if exc.error is not None and self._codec is not None:
                self._send_frame(transport_error(exc.error), delay_s=0.0)
        except FrameError as exc:
            reason = f"bad frame: {exc}"
        except TimeoutError:
            reason = "idle timeout" if self._codec is not None else "sent nothing, timed out"
        except asyncio.IncompleteReadError:
            reason = "closed by the client"
        except (ConnectionError, OSError) as exc:
            reason = f"socket error: {exc}"
        finally:
            log.info("%s: closed: %s", self.describe(), reason)
            await self._shutdown()

    def close(self) -> None:
        """Close from outside (fault close, server stop)."""
        self.closing = True
        self._writer.close()

    async def _shutdown(self) -> None:
        self.closing = True
        self._out.put_nowait(None)
        if self._writer_task is not None:
            try:
                await asyncio.wait_for(self._writer_task, 2.0)
            except TimeoutError:
                self._writer_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer_task
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._out.get()
            if item is None:
                return
            due, frame = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.effect().blackhole or self._writer.is_closing():
                continue
            self._writer.write(frame)
            try:
                await asyncio.wait_for(self._writer.drain(), self.server.config.write_timeout_s)
            except (ConnectionError, OSError, TimeoutError) as exc:
                log.info("%s: write failed: %s", self.describe(), exc or type(exc).__name__)
                self.close()
                return

    def _send_frame(self, payload: bytes, *, delay_s: float | None = None) -> None:
        assert self._codec is not None
        if delay_s is None:
            delay_s = self.effect().delay_ms / 1000
        due = asyncio.get_running_loop().time() + delay_s
        self._out.put_nowait((due, self._codec.encode(payload)))

    # inbound

    def _handle(self, packet: bytes) -> None:
        effect = self.effect()
        if effect.blackhole:
            return
        try:
            key_id = envelope.auth_key_id_of(packet)
        except EnvelopeError as exc:
            raise CloseConnection(f"malformed packet: {exc}", error=404) from None
        if key_id == 0:
            self._handle_plain(packet)
            return
        key = self.server.world.auth_key(key_id)
        if key is None:
            raise CloseConnection(f"unknown auth key id {key_id:#018x}", error=404)
        self.key = key
        effect = self.effect()
        if effect.blackhole:
            return
        if not self.admitted and effect.refuse:
            raise CloseConnection("refused (fault refuse)")
        try:
            inbound = envelope.decrypt(key, packet)
        except EnvelopeError as exc:
            raise CloseConnection(f"undecryptable message: {exc}", error=404) from None
        self.admitted = True
        if inbound.session_id != self.session_id:
            self._new_session(inbound)
        age = time.time() - envelope.msg_id_time(inbound.msg_id)
        if inbound.msg_id % 4:
            self._bad_msg(inbound.msg_id, inbound.seq_no, 18)
            return
        if age > MSG_TOO_OLD_S:
            self._bad_msg(inbound.msg_id, inbound.seq_no, 16)
            return
        if -age > MSG_TOO_NEW_S:
            self._bad_msg(inbound.msg_id, inbound.seq_no, 17)
            return
        try:
            items = envelope.split(Item(inbound.msg_id, inbound.seq_no, inbound.body))
        except EnvelopeError as exc:
            log.info("%s: bad container: %s", self.describe(), exc)
            self._bad_msg(inbound.msg_id, inbound.seq_no, 64)
            return
        for item in items:
            self._handle_item(item, effect)

    def _handle_plain(self, packet: bytes) -> None:
        try:
            _msg_id, body = envelope.unpack_plain(packet)
            request = BinaryReader(body).tgread_object()
        except (EnvelopeError, TypeNotFoundError, struct.error, BufferError) as exc:
            raise CloseConnection(f"malformed plain message: {exc}", error=404) from None
        if self._handshake is None:
            self._handshake = Handshake(self.server.key)
        try:
            answer = self._handshake.answer(request)
        except HandshakeError as exc:
            raise CloseConnection(f"auth key exchange failed: {exc}", error=404) from None
        self._send_frame(envelope.pack_plain(self._clock.next(answer=True), bytes(answer)))
        if self._handshake.auth_key is not None:
            self.server.world.add_auth_key(self._handshake.auth_key)
            self._salt = self._handshake.server_salt
            log.info(
                "%s: auth key %#018x created", self.describe(), self._handshake.auth_key.key_id
            )
            self._handshake = None

    def _new_session(self, inbound: envelope.Inbound) -> None:
        self.session_id = inbound.session_id
        self._seq = 0
        self._pushed.clear()
        self.updates_enabled = False
        self._send(
            bytes(
                types.NewSessionCreated(
                    first_msg_id=inbound.msg_id,
                    unique_id=int.from_bytes(os.urandom(8), "little", signed=True),
                    server_salt=self._salt,
                )
            ),
            content_related=False,
            answer=False,
        )

    def _bad_msg(self, msg_id: int, seq_no: int, code: int) -> None:
        self._send(
            bytes(
                types.BadMsgNotification(bad_msg_id=msg_id, bad_msg_seqno=seq_no, error_code=code)
            ),
            content_related=False,
            answer=True,
        )

    def _handle_item(self, item: Item, effect: Effect) -> None:
        try:
            obj = BinaryReader(item.body).tgread_object()
        except TypeNotFoundError as exc:
            log.info("%s: unknown constructor %#010x", self.describe(), exc.invalid_constructor_id)
            self._rpc_error(item.msg_id, 400, "INPUT_METHOD_INVALID")
            return
        except Exception as exc:  # Telethon's reader raises many kinds on bad input
            log.info("%s: undecodable request: %s: %s", self.describe(), type(exc).__name__, exc)
            self._rpc_error(item.msg_id, 400, "INPUT_FETCH_ERROR")
            return
        if isinstance(obj, types.MsgsAck):
            self._acked(obj.msg_ids)
        elif isinstance(obj, functions.PingRequest | functions.PingDelayDisconnectRequest):
            if isinstance(obj, functions.PingDelayDisconnectRequest):
                self._idle_timeout = max(float(obj.disconnect_delay), 1.0)
            self._send(bytes(types.Pong(msg_id=item.msg_id, ping_id=obj.ping_id)), answer=True)
        elif isinstance(obj, functions.GetFutureSaltsRequest):
            now = int(time.time())
            salts = [
                types.FutureSalt(
                    valid_since=_utc(now), valid_until=_utc(now + 86_400), salt=self._salt
                )
            ]
            self._send(bytes(types.FutureSalts(item.msg_id, now, salts)), answer=True)
        elif isinstance(obj, functions.DestroySessionRequest):
            self._send(bytes(types.DestroySessionOk(session_id=obj.session_id)), answer=True)
        elif isinstance(obj, TLRequest):
            self._handle_request(item.msg_id, unwrap(obj), effect)
        elif isinstance(obj, TLObject):
            log.debug("%s: ignoring %s", self.describe(), type(obj).__name__)

    def _handle_request(self, msg_id: int, request: Any, effect: Effect) -> None:
        assert self.key is not None
        call = Call(key_id=self.key.key_id, account_id=self.account_id, effect=effect)
        try:
            result = self.server.methods.call(call, request)
        except RpcFailure as exc:
            self._rpc_error(msg_id, exc.code, exc.message)
            return
        except RefuseConnection as exc:
            raise CloseConnection(str(exc)) from None
        self._send(envelope.rpc_result(msg_id, serialize_result(result)), answer=True)
        account = self.account_id
        if account is None or effect.revoked:
            return
        self.server.note_result(self.key.key_id, account, result)
        if not self.updates_enabled:
            self.updates_enabled = True
            # With "closed", the log says when each account had a live session, and where.
            log.info("%s: logged in", self.describe())
            self.server.flush_missed(self, account)

    def _rpc_error(self, msg_id: int, code: int, message: str) -> None:
        error = bytes(types.RpcError(error_code=code, error_message=message))
        self._send(envelope.rpc_result(msg_id, error), answer=True)

    def _acked(self, msg_ids: Iterable[int]) -> None:
        if self.key is None:
            return
        best = max((self._pushed.pop(m, 0) for m in msg_ids), default=0)
        if best:
            self.server.key_state(self.key.key_id, self.account_id).acked_pts = max(
                self.server.key_state(self.key.key_id, self.account_id).acked_pts, best
            )

    # outbound

    def _send(self, body: bytes, *, content_related: bool = True, answer: bool) -> int:
        assert self.key is not None and self.session_id is not None
        msg_id = self._clock.next(answer=answer)
        if content_related:
            seq_no = self._seq * 2 + 1
            self._seq += 1
        else:
            seq_no = self._seq * 2
        self._send_frame(
            envelope.encrypt(self.key, self._salt, self.session_id, msg_id, seq_no, body)
        )
        return msg_id

    def push(self, body: bytes, max_pts: int) -> None:
        """Push an ``updates`` object; remember its pts until the client acks it."""
        if self.closing or self.session_id is None:
            return
        msg_id = self._send(body, answer=False)
        self._pushed[msg_id] = max_pts
        if len(self._pushed) > MAX_PUSHED_REMEMBERED:
            self._pushed.pop(next(iter(self._pushed)))


def _utc(ts: int) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)


class SandboxServer:
    """The MTProto listener and everything its connections share."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.faults = FaultBoard()
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_states: dict[int, KeyState] = {}
        self._ids = itertools.count(1)
        self._listener: asyncio.Server | None = None
        self._bound_port: int | None = None
        self._refusing = False
        self._changed: dict[int, asyncio.Event] = {}
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.key = ServerKey.load_or_create(config.data_dir)
        self.store = Store(config.data_dir / "state.db")
        self.world = World(self.store)
        self.world.subscribe(self._on_updates)
        self.methods: Methods = Methods(
            self.world, host=self.advertised_host, port=config.port, effect_of=self.faults.effect
        )

    @property
    def advertised_host(self) -> str:
        if self.config.advertise_host:
            return self.config.advertise_host
        return "127.0.0.1" if self.config.host in ("0.0.0.0", "", "::") else self.config.host

    @property
    def port(self) -> int:
        """The bound port (useful when configured with port 0)."""
        if self._listener is not None and self._listener.sockets:
            return int(self._listener.sockets[0].getsockname()[1])
        return self._bound_port if self._bound_port is not None else self.config.port

    async def start(self) -> None:
        await self._listen()
        self.methods.port = self.port
        log.info(
            "sandbox MTProto on %s:%d (DC 2), data %s, key fingerprint %#018x",
            self.config.host,
            self.port,
            self.config.data_dir,
            self.key.fingerprint % (1 << 64),
        )

    async def _listen(self) -> None:
        port = self.config.port if self._bound_port is None else self._bound_port
        self._listener = await asyncio.start_server(
            self._accept, self.config.host, port, limit=self.config.max_frame_bytes * 2
        )
        self._bound_port = self.port
        self._refusing = False

    async def _pause_listening(self) -> None:
        """Refuse at the TCP level (ECONNREFUSED): stop listening; live connections stay."""
        if self._listener is not None and not self._refusing:
            self._refusing = True
            self._listener.close()
            await self._listener.wait_closed()

    async def stop(self) -> None:
        self._refusing = True  # no listening again while stopping
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            conn.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        stuck = list(self._tasks)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        self.store.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, next(self._ids), reader, writer)
        self.connections.add(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        log.info("%s: opened", conn.describe())
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self._tasks.discard(task)

    # faults

    async def apply_fault(self, target: str | int, fault: Fault) -> int:
        """Set or clear a fault; ``close`` closes live connections and a live ``blackhole``
        silences them (new ones are served). Returns connections hit."""
        hit = [c for c in self.connections if target == ALL or c.account_id == target]
        if fault.kind is FaultKind.CLOSE:
            for conn in hit:
                conn.close()
            log.info("fault close on %s: closed %d connection(s)", target, len(hit))
            return len(hit)
        if fault.live:
            for conn in hit:
                conn.blackholed_by.add(target)
            log.info("fault blackhole (live) on %s: %d connection(s)", target, len(hit))
            return len(hit)
        if fault.kind is FaultKind.CLEAR:
            await self.clear_faults(target)
            return len(hit)
        self.faults.set(target, fault)
        log.info("fault %s on %s", fault.kind.value, target)
        if target == ALL and fault.kind is FaultKind.REFUSE:
            await self._pause_listening()
        return len(hit)

    async def clear_faults(self, target: str | int) -> None:
        """Clear a target's faults, live blackholes included (``all``: every fault)."""
        self.faults.clear(target)
        for conn in self.connections:
            if target == ALL:
                conn.blackholed_by.clear()
            else:
                conn.blackholed_by.discard(target)
        log.info("faults cleared on %s", target)
        if self._refusing and not self.faults.effect(None).refuse:
            await self._listen()

    # updates

    def key_state(self, key_id: int, account_id: int | None) -> KeyState:
        state = self._key_states.get(key_id)
        if state is None:
            pts = self.world.pts(account_id) if account_id is not None else 0
            state = self._key_states[key_id] = KeyState(acked_pts=pts)
        return state

    def note_result(self, key_id: int, account_id: int, result: Any) -> None:
        """Advance a key's known pts from a result that carries one."""
        state = self.key_state(key_id, account_id)
        if isinstance(result, types.updates.State):
            state.acked_pts = max(state.acked_pts, result.pts)
        elif isinstance(result, types.updates.Difference):
            state.acked_pts = max(state.acked_pts, result.state.pts)
        elif isinstance(result, types.updates.DifferenceSlice):
            state.acked_pts = max(state.acked_pts, result.intermediate_state.pts)
        elif isinstance(result, types.UpdateShortSentMessage | types.messages.AffectedMessages):
            if state.acked_pts + result.pts_count == result.pts:
                state.acked_pts = result.pts
        elif isinstance(result, types.Updates):
            for update in result.updates:
                pts, count = getattr(update, "pts", None), getattr(update, "pts_count", None)
                if not (isinstance(pts, int) and isinstance(count, int)):
                    continue
                if state.acked_pts + count == pts:
                    state.acked_pts = pts

    def flush_missed(self, conn: Connection, account_id: int) -> None:
        """Push to a new session what its key has not acknowledged yet."""
        assert conn.key is not None
        state = self.key_state(conn.key.key_id, account_id)
        if state.acked_pts >= self.world.pts(account_id):
            return
        rows = self.world.updates_after(account_id, state.acked_pts, PUSH_LIMIT)
        if rows:
            viewer = self.world.account(account_id)
            conn.push(bytes(self.methods.updates_of(viewer, rows)), rows[-1].pts)
            log.info("%s: pushed %d missed update(s)", conn.describe(), len(rows))

    def _on_updates(self, account_id: int, rows: list[UpdateRow]) -> None:
        event = self._changed.pop(account_id, None)
        if event is not None:
            event.set()
        targets = [c for c in self.connections if c.updates_enabled and c.account_id == account_id]
        if not targets:
            return
        if self.faults.effect(account_id).revoked:
            return
        viewer = self.world.account(account_id)
        body = bytes(self.methods.updates_of(viewer, rows))
        for conn in targets:
            conn.push(body, rows[-1].pts)

    async def wait_changed(self, account_id: int, timeout: float) -> None:
        """Wait (at most ``timeout``) for the next update of an account."""
        event = self._changed.setdefault(account_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
