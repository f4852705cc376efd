"""A bot's spec and the fleet defaults, declared once.

Every field's type, built-in default, range and description is here and nowhere
else: the API validates requests against these Structs (``botspec.validate``),
its OpenAPI document is generated from them, the controller derives a bot's
effective spec and its health policy from them, and the bot's ``config.json``
(``botspec.config``) reuses the same field types.

A bot's *own* spec holds only the fields it was given; the fleet defaults (in the
database) fill the rest; the defaults declared here fill what neither sets.
``FleetDefaults`` ⊂ ``BotSpec`` (adds the credentials) ⊂ ``NewBot`` (adds the name).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from botspec.hostname import FLEET_HOST_PATTERN, MAX_FLEET_HOST
from botspec.names import NAME_PATTERN as NAME_PATTERN  # re-exported: declared there

# ----------------------------------------------------------------- field types
# ``extra["must"]`` is how a refusal reads when the declaration alone cannot say
# it well (a pattern); otherwise botspec.validate words it from the constraints.

TOKEN_PATTERN = r"^[0-9]{1,20}:[A-Za-z0-9_-]{1,128}$"
PLUGIN_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
TOPIC_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
HOST_PATTERN = r"^[A-Za-z0-9.:-]{1,253}$"

MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 65536
MAX_SETTINGS_BYTES = 64 * 1024
MAX_PLUGINS = 32
MAX_TOPICS = 64

Name = Annotated[
    str,
    Meta(
        pattern=NAME_PATTERN,
        description="The bot's name: its watcher is bot-<name>.",
        extra={"must": f"must match {NAME_PATTERN} (lower-case letter first)"},
    ),
]
Token = Annotated[
    str,
    Meta(
        pattern=TOKEN_PATTERN,
        description="A bot token from @BotFather. Secret: never returned.",
        extra={"must": "must look like '<bot id>:<secret>' (digits, a colon, letters)"},
    ),
]
Session = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=8192,
        description="A Telethon string session (a user account). Secret: never returned.",
        extra={"must": "must be a Telethon string session of 1 to 8192 characters"},
    ),
]
PluginRef = Annotated[
    str,
    Meta(
        pattern=PLUGIN_PATTERN,
        description="module:function of a plugin's setup(client, ctx).",
        extra={"must": "must be 'module:function', e.g. 'mybot.handlers:setup'"},
    ),
]
Topic = Annotated[
    str,
    Meta(
        pattern=TOPIC_PATTERN,
        description="A bus topic.",
        extra={"must": "must be a topic name ([A-Za-z0-9_.:-], 1 to 64)"},
    ),
]
Plugins = Annotated[
    tuple[PluginRef, ...],
    Meta(max_length=MAX_PLUGINS, description="Plugins set up in order, each 'module:function'."),
]
Topics = Annotated[
    tuple[Topic, ...],
    Meta(max_length=MAX_TOPICS, description="Bus topics this bot receives."),
]
Settings = Annotated[
    dict[str, Any],
    Meta(
        description=f"Handed to the plugins as ctx.settings (at most {MAX_SETTINGS_BYTES} bytes as JSON)."
    ),
]
MemoryLimitMb = Annotated[
    int,
    Meta(
        ge=MIN_MEMORY_MB,
        le=MAX_MEMORY_MB,
        description="Hard cap on the bot's private memory (RLIMIT_DATA), MB.",
    ),
]
GracefulTimeout = Annotated[
    float,
    Meta(ge=1, le=60, description="SIGTERM → the bot drains and exits within this, seconds."),
]
FleetHost = Annotated[
    str,
    Meta(
        pattern=FLEET_HOST_PATTERN,
        max_length=MAX_FLEET_HOST,
        description=(
            "The host whose controller runs the bot (its TGFLEET_HOST); changing it moves "
            "the bot: it stops on the old host before it starts on the new one. Default: "
            "the host whose API created it (a patch's null: the host whose API is asked)."
        ),
        extra={
            "must": "must be a host name: lower-case letters, digits and '-', "
            "dot-separated labels of 1 to 63, at most 253 characters"
        },
    ),
]
Launch = Annotated[
    Literal["fork", "exec"],
    Meta(
        description=(
            "How the bot's process starts: 'fork' from the fleet's preloaded fork server "
            "(small, fast; exec when the fork server is down), or 'exec' a fresh Python."
        ),
        extra={"must": "must be 'fork' or 'exec'"},
    ),
]
ApiId = Annotated[
    int,
    Meta(
        ge=1,
        le=2**31 - 1,
        description="Telegram api_id (my.telegram.org).",
        extra={"must": "must be a positive integer (a 32-bit api_id from my.telegram.org)"},
    ),
]
ApiHash = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        description="Telegram api_hash (my.telegram.org). Secret: never returned.",
    ),
]


class Server(Struct, frozen=True, forbid_unknown_fields=True):
    """A Telegram server other than the real one (the local sandbox)."""

    host: Annotated[
        str,
        Meta(
            pattern=HOST_PATTERN,
            description="Host name or IP address.",
            extra={"must": "must be a host name or IP address"},
        ),
    ]
    port: Annotated[int, Meta(ge=1, le=65535, description="TCP port.")]
    dc_id: Annotated[int, Meta(ge=1, le=1000, description="The data center it serves as.")]
    public_key: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=4096,
            description="Its RSA key, PKCS#1 PEM ('-----BEGIN RSA PUBLIC KEY-----').",
        ),
    ]


class Telegram(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the bot reaches Telegram."""

    api_id: ApiId | None = None
    api_hash: ApiHash | None = None
    server: Server | None = None


class ProcessHealth(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Health timing that the bot process itself uses (it is in its config.json)."""

    heartbeat_interval_s: Annotated[
        float, Meta(ge=0.2, le=60, description="Between heartbeats to the controller, seconds.")
    ] = 2.0
    probe_interval_s: Annotated[
        float,
        Meta(ge=0.5, le=300, description="Between probes of the Telegram connection, seconds."),
    ] = 3.0
    probe_timeout_s: Annotated[
        float, Meta(ge=0.5, le=60, description="One probe's deadline, seconds.")
    ] = 3.0
    connect_timeout_s: Annotated[
        float, Meta(ge=1, le=120, description="Connect and log-in deadline, seconds.")
    ] = 10.0


class Health(ProcessHealth, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Health settings: the bot's timing, then what the controller's health checker uses."""

    heartbeat_timeout_s: Annotated[
        float, Meta(ge=1, le=600, description="No heartbeat for this long: hung, killed, seconds.")
    ] = 10.0
    startup_timeout_s: Annotated[
        float,
        Meta(ge=5, le=600, description="Started but not ready for this long: killed, seconds."),
    ] = 30.0
    disconnect_grace_s: Annotated[
        float, Meta(ge=1, le=600, description="Telegram unreachable this long: restart, seconds.")
    ] = 10.0
    backoff_base_s: Annotated[
        float,
        Meta(
            ge=0.1,
            le=600,
            description="First delay between restarts of one failure streak, seconds.",
        ),
    ] = 2.0
    backoff_cap_s: Annotated[
        float, Meta(ge=1, le=3600, description="Longest delay between restarts, seconds.")
    ] = 120.0
    backoff_reset_s: Annotated[
        float, Meta(ge=1, le=86400, description="Healthy this long ends a failure streak, seconds.")
    ] = 60.0
    max_restarts: Annotated[
        int, Meta(ge=1, le=1000, description="Exits within restart_window_s before failed.")
    ] = 5
    restart_window_s: Annotated[
        float, Meta(ge=1, le=86400, description="The window max_restarts counts in, seconds.")
    ] = 60.0
    memory_soft_limit_mb: (
        Annotated[
            int,
            Meta(
                ge=64,
                le=MAX_MEMORY_MB,
                description="RSS above this: graceful restart (null: none).",
            ),
        ]
        | None
    ) = None


class Limits(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Kernel limits on the bot's process (rlimits; core dumps are always off)."""

    open_files: Annotated[
        int,
        Meta(ge=64, le=65536, description="Files and sockets open at once (RLIMIT_NOFILE)."),
    ] = 1024
    processes: Annotated[
        int,
        Meta(
            ge=16,
            le=4096,
            description=(
                "Processes and threads of the bot's user (RLIMIT_NPROC); applied only when "
                "tgfleet runs as root, where each bot has a user of its own."
            ),
        ),
    ] = 256


class FleetDefaults(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every field a bot may leave to the fleet defaults, with its built-in default."""

    plugins: Plugins = ()
    settings: Settings = {}
    memory_limit_mb: MemoryLimitMb = 512
    autostart: Annotated[
        bool, Meta(description="Run it whenever the fleet runs (else start it by hand).")
    ] = True
    graceful_timeout_s: GracefulTimeout = 5.0
    launch: Launch = "fork"
    subscribe: Topics = ()
    telegram: Telegram = Telegram()
    health: Health = Health()
    limits: Limits = Limits()


class BotSpec(FleetDefaults, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A bot's spec; with every default filled in, the effective spec it runs with."""

    token: Token | None = None
    session: Session | None = None
    #: Not stored in the spec: the bots table keeps it (controller/store.py).
    host: FleetHost | None = None


class NewBot(BotSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The body that creates a bot: a name, a credential, and any other field."""

    name: Name


#: Fields that hold secrets: accepted, stored, written to the bot's own config
#: file, never returned. Dotted paths into a spec.
SECRET_PATHS = ("token", "session", "telegram.api_hash")
CREDENTIALS = ("token", "session")
DEFAULTABLE_FIELDS = tuple(f.name for f in msgspec.structs.fields(FleetDefaults))
BOT_FIELDS = tuple(f.name for f in msgspec.structs.fields(BotSpec))
#: ``health`` keys that the bot process reads; the rest are the controller's.
PROCESS_HEALTH_KEYS = tuple(f.name for f in msgspec.structs.fields(ProcessHealth))
CONTROLLER_HEALTH_KEYS = tuple(
    f.name for f in msgspec.structs.fields(Health) if f.name not in PROCESS_HEALTH_KEYS
)


def process_health(health: Health) -> ProcessHealth:
    """The part of a bot's health settings that its own process reads."""
    return ProcessHealth(**{key: getattr(health, key) for key in PROCESS_HEALTH_KEYS})
