"""What the HTTP API answers and the small bodies it takes, declared as Structs.

The bot spec itself is ``botspec.spec``; these are the API's own documents. The
OpenAPI document (controller/openapi.py) is generated from them and from the
route table, and schemathesis checks every answer against it. Views are not
closed (no ``forbid_unknown_fields``): a newer controller may add keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from botspec.spec import CREDENTIALS, Name, NewBot, Topic
from botspec.validate import struct_of
from controller.access import Scope

State = Literal["configuring", "starting", "running", "stopping", "stopped", "failed", "destroyed"]
Timestamp = Annotated[
    str, Meta(description="ISO 8601 date-time", extra_json_schema={"format": "date-time"})
]


class FieldProblem(Struct, frozen=True):
    field: Annotated[str, Meta(description="Dotted path of the refused field ('' for the body).")]
    message: str


class Problem(Struct, frozen=True, omit_defaults=True):
    """An RFC 9457 problem document: every error the API gives."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] = []


class TelegramView(Struct, frozen=True):
    connected: bool
    last_update_age_s: float | None
    last_error: str | None
    disconnected_since: float | None
    flood_wait_until: float | None


class FailureView(Struct, frozen=True):
    kind: str
    reason: str
    since: Timestamp | None


class LastFailureView(Struct, frozen=True):
    kind: str
    reason: str
    at: Timestamp | None


class HealthView(Struct, frozen=True):
    status: Literal["healthy", "failing", "backoff", "failed", "unknown"]
    failure: FailureView | None
    last_failure: LastFailureView | None
    next_restart_at: Timestamp | None
    restart_attempt: int
    flood_wait_until: Timestamp | None
    heartbeat_age_s: float | None
    heartbeats_missed: int
    max_heartbeat_gap_s: float | None


class ResourcesView(Struct, frozen=True):
    """The bot's process as the controller last sampled it from /proc (every 2 s)."""

    pid: Annotated[int, Meta(description="The process sampled: the bot's own.")]
    cpu_percent: Annotated[
        float | None,
        Meta(description="CPU over the last interval, % of one core; null on the first sample."),
    ]
    cpu_seconds: Annotated[float, Meta(description="CPU time so far, user + system.")]
    rss_bytes: Annotated[int, Meta(description="Resident memory.")]
    pss_bytes: Annotated[
        int | None,
        Meta(
            description="Proportional set size (shared pages split among sharers); null if unreadable."
        ),
    ]
    data_bytes: Annotated[
        int, Meta(description="Private writable memory: what memory_limit_mb (RLIMIT_DATA) caps.")
    ]
    data_limit_bytes: Annotated[
        int | None, Meta(description="Its RLIMIT_DATA; null when unlimited.")
    ]
    open_files: Annotated[
        int | None, Meta(description="Open file descriptors; null if unreadable.")
    ]
    open_files_limit: Annotated[
        int | None, Meta(description="Its RLIMIT_NOFILE (limits.open_files); null when unlimited.")
    ]
    threads: int


class MessagesView(Struct, frozen=True):
    """The bot's own counters since its process started, from its last heartbeat."""

    received: Annotated[
        int | None,
        Meta(description="Telegram messages received (not its own); null from an older bot."),
    ]
    sent: Annotated[int | None, Meta(description="Telegram messages sent; null from an older bot.")]
    handled: Annotated[int, Meta(description="Handler runs that ended well.")]
    handler_errors: Annotated[int, Meta(description="Handler runs that raised.")]


class BotView(Struct, frozen=True):
    """A bot as the API shows it: desired and actual state, health, its spec without secrets."""

    name: Name
    state: State
    health: HealthView
    desired: Literal["running", "stopped"]
    since: Timestamp
    reason: str
    pid: int | None
    uptime_s: float | None
    restarts: int
    rss_mb: float | None
    telegram: TelegramView
    resources: Annotated[
        ResourcesView | None, Meta(description="Null while no process of the bot is sampled.")
    ]
    messages: Annotated[
        MessagesView | None, Meta(description="Null until the process's first heartbeat.")
    ]
    generation: int
    version: Annotated[int, Meta(description="The spec's version; the ETag names it.")]
    watcher: str
    host: Annotated[
        str | None,
        Meta(description="The host whose controller should run it (TGFLEET_HOST)."),
    ]
    held_by: Annotated[
        str | None,
        Meta(
            description="The host whose controller runs it now (null: none). It differs "
            "from host while a move waits for the old host to stop it."
        ),
    ]
    local: Annotated[
        bool,
        Meta(
            description="Held by the host that answers: pid, uptime_s, rss_mb, telegram and "
            "health are its own observation. False: they are not known here (null, false, "
            "unknown); state is what the holder last recorded."
        ),
    ]
    spec: Annotated[
        dict[str, Any],
        Meta(description="The bot's own spec (fleet defaults not merged), secrets left out."),
    ]
    stale: Annotated[
        bool, Meta(description="Present while PostgreSQL is away: answered from memory.")
    ] = False
    as_of: Timestamp | None = None


class BotList(Struct, frozen=True):
    bots: list[BotView]


class Destroyed(Struct, frozen=True):
    name: Name
    state: Literal["destroyed"]


class EventView(Struct, frozen=True):
    id: int
    at: Timestamp
    bot: str | None
    kind: str
    actor: str
    from_state: str | None
    to_state: str | None
    reason: str
    data: dict[str, Any]


class EventList(Struct, frozen=True):
    events: list[EventView]


class LogTail(Struct, frozen=True):
    name: Name
    stream: Literal["out", "err"]
    path: str
    lines: list[str]


ScopeName = Annotated[
    Scope,
    Meta(
        description="What the token may do: read (every GET), operate (also start, stop, "
        "restart, publish), admin (also create, change, destroy, defaults, tokens)."
    ),
]


class NewToken(Struct, frozen=True, forbid_unknown_fields=True):
    """Creates an API token."""

    name: Name
    scope: ScopeName
    expires_at: Annotated[
        Timestamp | None,
        Meta(description="When it stops working (with a time zone); never if null."),
    ] = None


class TokenView(Struct, frozen=True):
    name: str
    scope: ScopeName
    created_at: Timestamp
    expires_at: Timestamp | None
    last_used_at: Annotated[
        Timestamp | None, Meta(description="Last use, to the minute; null if never used.")
    ]
    revoked_at: Timestamp | None


class CreatedToken(TokenView, frozen=True):
    token: Annotated[str, Meta(description="The secret: shown this once only.")]


class TokenList(Struct, frozen=True):
    tokens: list[TokenView]


class Resealed(Struct, frozen=True):
    """What a rotation of the secret key did."""

    rewritten: Annotated[int, Meta(description="Rows whose secrets were sealed again.")]
    key_source: Annotated[str, Meta(description="<home>/secret.key or TGFLEET_SECRET_KEY.")]


class Publish(Struct, frozen=True, forbid_unknown_fields=True):
    """An event to publish on the bus."""

    topic: Topic
    data: Any = None


class ControllerView(Struct, frozen=True):
    pid: int
    rss_mb: float | None
    host: Annotated[str, Meta(description="This controller's host (TGFLEET_HOST).")]


class DatabaseView(Struct, frozen=True):
    """Whether PostgreSQL answers, and what waits for it."""

    reachable: bool
    unreachable_since: Timestamp | None
    error: str | None
    timeout_s: float
    writes_queued: int
    writes_dropped: int


class Status(Struct, frozen=True):
    bots: int
    states: dict[str, int]
    telegram_connected: int
    controller: ControllerView
    database: DatabaseView
    reconcile_error: str | None


class HostView(Struct, frozen=True):
    """A controller sharing the database, by its heartbeat (the database's clock)."""

    name: str
    started_at: Annotated[
        Timestamp | None, Meta(description="Null: bots are placed on it, it was never seen.")
    ]
    seen_at: Timestamp | None
    silent_s: Annotated[float | None, Meta(description="Seconds since it was last seen.")]
    alive: Annotated[bool, Meta(description="Seen within the last few seconds.")]
    api_url: str
    held: Annotated[int, Meta(description="Bots its controller holds (runs, or stops).")]
    placed: Annotated[int, Meta(description="Bots whose host it is.")]
    answering: Annotated[bool, Meta(description="The host whose API answered this.")]


class HostList(Struct, frozen=True):
    hosts: list[HostView]


class ForgottenHost(Struct, frozen=True):
    host: str
    released: Annotated[list[str], Meta(description="The bots it held: nobody holds them now.")]


class Readiness(Struct, frozen=True):
    status: Literal["ready"]
    database: DatabaseView


class Liveness(Struct, frozen=True):
    status: Literal["ok"]


Defaults = Annotated[
    dict[str, Any],
    Meta(description="The fleet defaults (see FleetDefaults), secrets left out."),
]


def _patch_of(struct: type[Struct], name: str, *, top: bool) -> type[Struct]:
    """A JSON merge patch (RFC 7396) of ``struct``: every field optional, null removes it.

    Nested objects are patches themselves. Credentials cannot be null (replace one
    by setting the other)."""
    fields: list[tuple[str, Any, Any]] = []
    for field in msgspec.structs.fields(struct):
        if top and field.name == "name":
            continue
        tp = field.type
        nested = struct_of(tp)
        if nested is not None:
            tp = _patch_of(nested, f"{nested.__name__}Patch", top=False)
        if not (top and field.name in CREDENTIALS):
            tp = tp | None
        fields.append((field.name, tp | msgspec.UnsetType, msgspec.UNSET))
    return msgspec.defstruct(name, fields, frozen=True, forbid_unknown_fields=True, kw_only=True)


#: The body of PATCH /bots/{name}, derived from the spec's declaration.
BotPatch = _patch_of(NewBot, "BotPatch", top=True)
