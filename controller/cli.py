"""The `tgfleet` command. Everything but `up` and `sandbox` talks to the HTTP API.

Built on the standard library's argparse, and every command imports what it uses
when it runs: `tgfleet bots list` pays for a small HTTP client, not for the
controller, the sandbox or Telethon (tests/unit/test_cli.py guards the budget).

Adding a command: a function ``(args: argparse.Namespace) -> int | None`` (its
docstring is its help: first line in listings, all of it under ``--help``),
decorated with ``@command("group name", *options)``. A new group needs a line in
``GROUPS``. Options are ``opt(...)``, which takes ``add_argument``'s arguments;
``*API`` adds ``--home``, ``--api``, ``--api-token`` and ``--json``. A command
raises ``Failure`` (exit 1) or ``UsageError`` (exit 2, with the usage line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

if TYPE_CHECKING:
    from controller.settings import ControllerSettings

Run = Callable[[argparse.Namespace], "int | None"]


class Option(NamedTuple):
    """One ``add_argument`` call: its flags (or a positional's name) and keywords."""

    flags: tuple[str, ...]
    keywords: dict[str, Any]


def opt(*flags: str, **keywords: Any) -> Option:
    return Option(flags, keywords)


class Command(NamedTuple):
    path: tuple[str, ...]  # ("bots", "list")
    run: Run
    options: tuple[Option, ...]
    #: Every argument after the path goes to ``run`` as ``args.rest``, unparsed
    #: (`tgfleet sandbox …` belongs to the sandbox's own CLI, --help included).
    passthrough: bool = False


#: Subcommand groups and their help (`tgfleet --help` lists a group where its
#: first command was registered).
GROUPS: dict[str, str] = {
    "bots": "Create, change, start, stop and destroy bots.",
    "hosts": "The controllers sharing one database (several servers).",
    "token": "API tokens.",
    "secret": "The key that seals secrets in the database.",
    "render": "Print deploy files: circus.ini, Kubernetes manifests.",
}
COMMANDS: list[Command] = []


def command(path: str, *options: Option, passthrough: bool = False) -> Callable[[Run], Run]:
    """Register ``run`` as `tgfleet <path>` with these options."""

    def register(run: Run) -> Run:
        COMMANDS.append(Command(tuple(path.split()), run, options, passthrough))
        return run

    return register


class Failure(Exception):
    """The command cannot do what was asked: `error: <message>` on stderr, exit 1."""


class UsageError(Exception):
    """The command line is wrong: the usage line and the message on stderr, exit 2."""


def fail(message: str) -> NoReturn:
    raise Failure(message)


def echo(text: str = "", *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


#: Where the fleet keeps its state (every command that finds the fleet takes it).
HOME = opt("--home", help="State dir (default $TGFLEET_HOME or ./.tgfleet).")

API = (
    HOME,
    opt("--api", help="API URL (default from the home dir)."),
    opt(
        "--api-token",
        dest="token",
        metavar="TOKEN",
        help="API token (default $TGFLEET_TOKEN or <home>/admin.token).",
    ),
    opt("--json", dest="as_json", action="store_true", help="Machine-readable output."),
)
NAME = opt("name", help="The bot's name.")


def segment(value: str) -> str:
    """``value`` as one path segment of a URL: `bots destroy 'shop?x'` must not
    destroy shop (the API refuses the name it does not know, by that name)."""
    from urllib.parse import quote

    return quote(value, safe="")


def call(args: argparse.Namespace, method: str, path: str, body: object | None = None) -> Any:
    """One request to the API; an error answer or an unreachable API ends the command."""
    from controller.client import ApiClient, ApiError, ApiUnreachable
    from controller.home import Home

    client = ApiClient.discover(Home.resolve(args.home), args.api, args.token)
    try:
        return client.request(method, path, body)
    except ApiError as exc:
        lines = [f"{exc} (HTTP {exc.status})"]
        for item in exc.problem.get("errors", []):
            lines.append(f"  {item.get('field') or '(body)'}: {item.get('message')}")
        fail("\n".join(lines))
    except ApiUnreachable as exc:
        fail(str(exc))


def show(result: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        echo(json.dumps(result, indent=2))
    elif text is not None:
        echo(text)


# ------------------------------------------------------------------ tables


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def shown(cell: object) -> str:
    """A cell as a terminal may show it: a character that is not printable (ESC and the
    other controls, a newline, a bidi override) written as its escape, never obeyed. A
    host's name and URL come from the shared database, which any controller writes."""
    return "".join(c if c.isprintable() else _escape(c) for c in str(cell))


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def table(
    rows: list[list[str]], header: list[str], paint: Callable[[int, str], str] | None = None
) -> str:
    """Left-aligned columns; ``paint(column, padded cell)`` may colour a cell after padding.
    Every cell is ``shown``: what a row holds cannot move the cursor or break a line."""
    header, rows = [shown(c) for c in header], [[shown(c) for c in row] for row in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]

    def line(cells: Sequence[str], colour: bool) -> str:
        padded = [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        if colour and paint is not None:
            padded = [paint(i, cell) for i, cell in enumerate(padded)]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header, False), *(line(r, True) for r in rows)])


def _memory(bot: dict[str, Any]) -> str:
    rss = bot.get("rss_mb")
    limit = bot.get("memory_limit_mb") or (bot.get("spec") or {}).get("memory_limit_mb")
    if rss is None:
        return "-"
    return f"{rss:.0f}/{limit}MB" if limit else f"{rss:.0f}MB"  # no space: one word per cell


def _cpu(percent: float | None) -> str:
    return "-" if percent is None else f"{percent:.0f}%"


def _messages(value: dict[str, Any]) -> str:
    """Received/sent since the bot's process started (the API's `messages`)."""
    return "/".join("-" if value.get(k) is None else str(value[k]) for k in ("received", "sent"))


def _field(key: str, cell: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    def read(bot: dict[str, Any]) -> str:
        value = bot.get(key)
        return "-" if value is None else cell(value)

    return read


class Column(NamedTuple):
    header: str
    field: str  # shown only when some bot in the answer carries this key
    cell: Callable[[dict[str, Any]], str]


#: `tgfleet bots list`, compact like `pm2 ls`. CPU (`resources`) and messages come with
#: newer controllers: a column whose field no bot of the answer has is left out.
BOT_COLUMNS = (
    Column("NAME", "name", lambda b: b["name"]),
    Column("STATE", "state", lambda b: b["state"]),
    Column("HOST", "host", _field("host", str)),
    Column("HEALTH", "health", lambda b: (b.get("health") or {}).get("status") or "-"),
    Column(
        "TELEGRAM",
        "telegram",
        lambda b: "yes" if (b.get("telegram") or {}).get("connected") else "no",
    ),
    Column("PID", "pid", _field("pid", str)),
    Column("UPTIME", "uptime_s", lambda b: _age(b.get("uptime_s"))),
    Column("RESTARTS", "restarts", _field("restarts", str)),
    Column("CPU", "resources", lambda b: _cpu((b.get("resources") or {}).get("cpu_percent"))),
    Column("MEM", "rss_mb", _memory),
    Column("MSGS", "messages", _field("messages", _messages)),
)

STATE_COLOURS = {
    "running": "32",  # green
    "starting": "33",  # yellow
    "stopping": "33",
    "configuring": "33",
    "failed": "31",  # red
    "stopped": "2",  # dim
}


def colour_wanted() -> bool:
    """Colour on a terminal, unless NO_COLOR (https://no-color.org) is set."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def bots_table(bots: list[dict[str, Any]], colour: bool = False) -> str:
    columns = [c for c in BOT_COLUMNS if any(c.field in b for b in bots)]
    rows = [[c.cell(b) for c in columns] for b in bots]
    state = next((i for i, c in enumerate(columns) if c.field == "state"), -1)

    def paint(index: int, cell: str) -> str:
        code = STATE_COLOURS.get(cell.strip()) if index == state else None
        return f"\x1b[{code}m{cell}\x1b[0m" if code else cell

    return table(rows, [c.header for c in columns], paint if colour else None)


# ---------------------------------------------------------------------- up


#: What `tgfleet up` and `tgfleet render circus-ini` both take.
UP_OPTIONS = (
    HOME,
    opt("--listen", help="API HOST:PORT (default $TGFLEET_LISTEN or 127.0.0.1:8710)."),
    opt("--tls-cert", help="Serve the API over HTTPS with this PEM cert."),
    opt("--tls-key", help="The private key (PEM) of --tls-cert."),
    opt(
        "--insecure-listen",
        action="store_true",
        help="Allow plain HTTP on a non-loopback --listen (not advised).",
    ),
    opt("--host", help="This controller's host name (default $TGFLEET_HOST or the machine's)."),
)


def _up_options(args: argparse.Namespace) -> dict[str, Any]:
    """UP_OPTIONS (and --demo) as `controller.up.options_from_env` takes them."""
    return {
        "home": args.home,
        "listen": args.listen,
        "demo": args.demo,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "insecure_listen": args.insecure_listen,
        "host": args.host,
    }


@command(
    "up",
    opt("--demo", action="store_true", help="Also run the local Telegram sandbox with demo bots."),
    *UP_OPTIONS,
)
def up(args: argparse.Namespace) -> NoReturn:
    """Run the fleet in the foreground: circusd, PostgreSQL, controller, bots.

    Ctrl-C stops it all."""
    from controller import up as up_module
    from controller.home import HomeError
    from controller.pg import EmbeddedPgError
    from controller.settings import SettingsError

    try:
        options = up_module.options_from_env(**_up_options(args))
        resolved = options.home
        warning = up_module.insecure_listen_warning(options)
        if warning is not None and args.insecure_listen:
            echo(warning, err=True)

        def banner(settings: ControllerSettings) -> str:
            bin_dir = os.path.dirname(sys.executable)
            return "\n".join(
                [
                    f"tgfleet is up in {resolved.root}",
                    f"  API:       {settings.api_url}  (token in {resolved.admin_token})",
                    f"  bots:      {bin_dir}/tgfleet bots list",
                    f"  circus:    {bin_dir}/circusctl --endpoint {resolved.circus_endpoint} status",
                    f"  logs:      {resolved.logs_dir}",
                    "  Ctrl-C stops everything.",
                ]
            )

        up_module.run(options, banner)  # becomes circusd: returns only by raising
    except (up_module.UpError, HomeError, SettingsError, EmbeddedPgError) as exc:
        fail(str(exc))


@command("remove-users", HOME)
def remove_users(args: argparse.Namespace) -> None:
    """Remove the system users and the group a fleet made as root (its bots', its
    service user), for a home you throw away; its files are left as they are.

    tgfleet keeps them while the home is there (a restarted fleet finds them again).
    Refused while that fleet runs, and to anyone but root."""
    import grp

    from controller import up as up_module
    from controller.botusers import BotUserError, BotUsers, fleet_group_name
    from controller.home import Home
    from controller.sysusers import SystemUserError

    if os.geteuid() != 0:
        fail("only root removes system users (a fleet run by another user made none)")
    home = Home.resolve(args.home)
    if up_module.fleet_running(home):
        fail(f"a fleet is running in {home.root}: stop it first (Ctrl-C on its `tgfleet up`)")
    group = fleet_group_name(home)
    had_group = group in {entry.gr_name for entry in grp.getgrall()}
    try:
        removed = BotUsers(home).remove_all()
    except (BotUserError, SystemUserError) as exc:
        fail(str(exc))
    for name in removed:
        echo(f"removed user {name}")
    if had_group:
        echo(f"removed group {group}")
    if not removed and not had_group:
        echo(f"nothing to remove: no user or group of the fleet in {home.root}")


# -------------------------------------------------------------------- bots


@command("bots list", *API)
def bots_list(args: argparse.Namespace) -> None:
    """Every bot: state, health, Telegram, pid, uptime, restarts, CPU, memory, messages."""
    result = call(args, "GET", "/api/v1/bots")
    bots = result["bots"]
    show(
        result,
        args.as_json,
        bots_table(bots, colour_wanted())
        if bots
        else "no bots yet: tgfleet bots create NAME --token …",
    )


@command("bots show", NAME, *API)
def bots_show(args: argparse.Namespace) -> None:
    """One bot in full."""
    bot = call(args, "GET", f"/api/v1/bots/{segment(args.name)}")
    lines = [
        bots_table([bot], colour_wanted()),
        "",
        f"desired: {bot['desired']}   since: {bot['since']}",
    ]
    if bot.get("reason"):
        lines.append(f"reason:  {bot['reason']}")
    lines.append("spec:    " + json.dumps(bot["spec"], sort_keys=True))
    show(bot, args.as_json, "\n".join(lines))


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that is valid JSON is taken as JSON (numbers, true, lists)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--setting: {pair!r} is not key=value")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


SPEC = (
    opt(
        "--token",
        dest="bot_token",
        metavar="TOKEN",
        help="The bot's Telegram token (from @BotFather or the sandbox); '-' reads it from "
        "stdin (on the command line, `ps` shows it to every user while the command runs).",
    ),
    opt("--session", help="A Telethon string session (user account); '-': stdin."),
    opt("--plugin", action="append", metavar="MODULE:FUNCTION", help="A plugin (repeatable)."),
    opt("--setting", action="append", metavar="KEY=VALUE", help="For plugins (repeatable)."),
    opt("--memory-limit", type=int, metavar="MB", help="Memory limit in MB."),
    opt(
        "--host",
        dest="bot_host",
        metavar="NAME",
        help="The host whose controller runs it (on update: moves it there).",
    ),
    opt("--spec-file", metavar="FILE", help="JSON file with more spec fields."),
)


def _spec_from_options(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.spec_file:
        try:
            with open(args.spec_file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--spec-file: cannot read {args.spec_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--spec-file: {args.spec_file} must hold a JSON object")
        body.update(loaded)
    if args.bot_token == "-" and args.session == "-":
        raise UsageError("only one of --token and --session can be read from stdin")
    if args.bot_token is not None:
        body["token"] = _from_stdin("--token") if args.bot_token == "-" else args.bot_token
    if args.session is not None:
        body["session"] = _from_stdin("--session") if args.session == "-" else args.session
    if args.plugin:
        body["plugins"] = args.plugin
    if args.setting:
        body["settings"] = parse_settings(args.setting)
    if args.memory_limit is not None:
        body["memory_limit_mb"] = args.memory_limit
    if args.bot_host is not None:
        body["host"] = args.bot_host
    return body


def _from_stdin(option: str) -> str:
    """A credential read from stdin (its first line): on the command line, every user
    of the machine could read it in `ps` while the command runs."""
    value = sys.stdin.readline().strip()
    if not value:
        raise UsageError(f"{option}: '-' reads it from stdin, which gave nothing")
    return value


@command(
    "bots create",
    NAME,
    *SPEC,
    opt("--no-autostart", action="store_true", help="Create it stopped."),
    *API,
)
def bots_create(args: argparse.Namespace) -> None:
    """Create a bot (and start it unless --no-autostart)."""
    body = {"name": args.name, **_spec_from_options(args)}
    if args.no_autostart:
        body["autostart"] = False
    bot = call(args, "POST", "/api/v1/bots", body)
    show(bot, args.as_json, f"created {bot['name']}: {bot['state']}")


@command("bots update", NAME, *SPEC, *API)
def bots_update(args: argparse.Namespace) -> None:
    """Change a bot (settings merge key by key); that bot alone restarts."""
    body = _spec_from_options(args)
    if not body:
        raise UsageError(
            "give at least one change (--setting, --plugin, --memory-limit, --host, …)"
        )
    bot = call(args, "PATCH", f"/api/v1/bots/{segment(args.name)}", body)
    show(
        bot, args.as_json, f"updated {bot['name']}: {bot['state']} (generation {bot['generation']})"
    )


def _lifecycle(op: str) -> None:
    def run(args: argparse.Namespace) -> None:
        bot = call(args, "POST", f"/api/v1/bots/{segment(args.name)}/{op}")
        show(bot, args.as_json, f"{bot['name']}: {bot['state']}")

    run.__doc__ = f"{op.capitalize()} a bot."
    command(f"bots {op}", NAME, *API)(run)


for _op in ("start", "stop", "restart"):
    _lifecycle(_op)


@command("bots destroy", NAME, *API)
def bots_destroy(args: argparse.Namespace) -> None:
    """Stop a bot and remove its watcher, files and private dir (its events stay)."""
    result = call(args, "DELETE", f"/api/v1/bots/{segment(args.name)}")
    show(result, args.as_json, f"destroyed {args.name}")


@command(
    "bots logs",
    NAME,
    opt(
        "--stream",
        default="err",
        help="err (default: Telethon and tgfleet logs) or out.",
    ),
    opt("--lines", "-n", type=int, default=50, help="How many lines (default 50)."),
    opt("--follow", "-f", action="store_true", help="Keep printing new lines."),
    *API,
)
def bots_logs(args: argparse.Namespace) -> None:
    """The tail of a bot's log."""
    import time

    name, stream = args.name, args.stream
    result = call(
        args, "GET", f"/api/v1/bots/{segment(name)}/logs?stream={stream}&lines={args.lines}"
    )
    show(result, args.as_json, "\n".join(result["lines"]))
    seen = result["lines"]
    while args.follow:
        time.sleep(1)
        latest = call(args, "GET", f"/api/v1/bots/{segment(name)}/logs?stream={stream}&lines=200")[
            "lines"
        ]
        for line in new_lines(seen, latest):
            echo(line)
        seen = latest


def new_lines(seen: list[str], latest: list[str]) -> list[str]:
    """The lines of the log's latest tail that come after the tail seen before."""
    for overlap in range(min(len(seen), len(latest)), 0, -1):
        if seen[-overlap:] == latest[:overlap]:
            return latest[overlap:]
    return latest  # nothing in common (rotated, or more new lines than a tail holds)


@command(
    "bots events",
    NAME,
    opt("--limit", type=int, default=100, help="How many (oldest first; default 100)."),
    *API,
)
def bots_events(args: argparse.Namespace) -> None:
    """A bot's event history: who changed what, when and why."""
    result = call(args, "GET", f"/api/v1/bots/{segment(args.name)}/events?limit={args.limit}")
    rows = [
        [
            e["at"][:19],
            e["kind"],
            f"{e['from_state'] or ''}→{e['to_state'] or ''}".strip("→"),
            e["actor"],
            e["reason"],
        ]
        for e in result["events"]
    ]
    show(result, args.as_json, table(rows, ["AT", "KIND", "STATE", "ACTOR", "REASON"]))


# ------------------------------------------------------------------ status


def database_line(database: dict[str, Any]) -> str:
    """`database: reachable`, or since when it is not and what waits for it."""
    queued = f"; {database['writes_queued']} writes queued" if database["writes_queued"] else ""
    dropped = f", {database['writes_dropped']} dropped" if database["writes_dropped"] else ""
    if database["reachable"]:
        return f"database: reachable{queued}{dropped}"
    return (
        f"database: UNREACHABLE since {database['unreachable_since']} "
        f"({database['error']}); answers are stale{queued}{dropped}"
    )


@command("status", *API)
def status(args: argparse.Namespace) -> None:
    """The fleet at a glance."""
    summary = call(args, "GET", "/api/v1/status")
    listing = call(args, "GET", "/api/v1/bots")
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items())) or "no bots"
    text = [
        f"bots: {summary['bots']} ({states}); Telegram connected: {summary['telegram_connected']}",
        f"controller: pid {summary['controller']['pid']}, {summary['controller']['rss_mb']} MB",
    ]
    text.append(database_line(summary["database"]))
    if summary.get("reconcile_error"):
        text.append(f"last reconcile error: {summary['reconcile_error']}")
    if listing["bots"]:
        text += ["", bots_table(listing["bots"], colour_wanted())]
    show({**summary, "bot_list": listing["bots"]}, args.as_json, "\n".join(text))


# ------------------------------------------------------------------- hosts


def hosts_table(hosts: list[dict[str, Any]]) -> str:
    rows = [
        [
            h["name"],
            "yes" if h["alive"] else "no",
            "never" if h["silent_s"] is None else f"{_age(h['silent_s'])} ago",
            str(h["held"]),
            str(h["placed"]),
            "yes" if h["answering"] else "",
            h["api_url"] or "-",
        ]
        for h in hosts
    ]
    return table(rows, ["NAME", "ALIVE", "SEEN", "HELD", "PLACED", "ANSWERING", "API"])


@command("hosts list", *API)
def hosts_list(args: argparse.Namespace) -> None:
    """The controllers sharing the database: alive, last seen, bots held and placed."""
    result = call(args, "GET", "/api/v1/hosts")
    show(result, args.as_json, hosts_table(result["hosts"]))


@command("hosts forget", opt("name", help="The host's name."), *API)
def hosts_forget(args: argparse.Namespace) -> None:
    """Forget a host that is gone for good: the bots it held may start on their hosts.

    Refused while that host was seen lately (TGFLEET_HOST_FORGET_AFTER_S): it may still
    run them. Move its bots first (`tgfleet bots update NAME --host OTHER`)."""
    result = call(args, "DELETE", f"/api/v1/hosts/{segment(args.name)}")
    released = ", ".join(result["released"]) or "no bots"
    show(result, args.as_json, f"forgot {result['host']}: it held {released}")


# ------------------------------------------------------------------ tokens


@command(
    "token create",
    opt("name", help="The token's name."),
    opt(
        "--scope",
        default="read",
        help="read (every GET; the default: least privilege), operate (also "
        "start/stop/restart/publish) or admin (everything).",
    ),
    opt(
        "--expires-in",
        metavar="DURATION",
        help="It stops working after this: 90s, 15m, 12h, 30d, 2w.",
    ),
    *API,
)
def token_create(args: argparse.Namespace) -> None:
    """A new API token; its secret is printed once."""
    from datetime import UTC, datetime, timedelta

    from controller.access import SCOPES, parse_duration

    if args.scope not in SCOPES:
        fail(f"--scope must be one of {', '.join(SCOPES)}, not {args.scope!r}")
    body: dict[str, Any] = {"name": args.name, "scope": args.scope}
    if args.expires_in is not None:
        try:
            seconds = parse_duration(args.expires_in)
        except ValueError as exc:
            fail(f"--expires-in: {exc}")
        body["expires_at"] = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    result = call(args, "POST", "/api/v1/tokens", body)
    show(result, args.as_json, result["token"])


@command("token list", *API)
def token_list(args: argparse.Namespace) -> None:
    """API tokens (names, scopes and dates, never secrets)."""
    result = call(args, "GET", "/api/v1/tokens")
    rows = [
        [
            t["name"],
            t["scope"],
            t["created_at"][:19],
            (t["expires_at"] or "never")[:19],
            (t["last_used_at"] or "never")[:16],
            (t["revoked_at"] or "")[:19],
        ]
        for t in result["tokens"]
    ]
    header = ["NAME", "SCOPE", "CREATED", "EXPIRES", "LAST USED", "REVOKED"]
    show(result, args.as_json, table(rows, header))


@command("token revoke", opt("name", help="The token's name."), *API)
def token_revoke(args: argparse.Namespace) -> None:
    """Revoke an API token."""
    result = call(args, "DELETE", f"/api/v1/tokens/{segment(args.name)}")
    show(result, args.as_json, f"revoked {args.name}")


@command("secret rotate", *API)
def secret_rotate(args: argparse.Namespace) -> None:
    """Seal every stored secret with a new key (<home>/secret.key), or with the first key
    of TGFLEET_SECRET_KEY when the controller's key comes from there."""
    result = call(args, "POST", "/api/v1/secrets/rotate")
    show(
        result,
        args.as_json,
        f"sealed {result['rewritten']} rows again; the key is in {result['key_source']}",
    )


# ----------------------------------------------------------------- sandbox


@command("sandbox", passthrough=True)
def sandbox(args: argparse.Namespace) -> int:
    """The local Telegram (MTProto sandbox): serve it, or drive a running one.

    Every argument goes to the sandbox's own CLI: `tgfleet sandbox --help`."""
    # Imported only here: the sandbox's code (Telethon, aiohttp, cryptography) would
    # cost every other command its import time, and it is an optional extra.
    import tgsandbox

    problem = tgsandbox.requirements_problem()
    if problem is not None:
        fail(problem)
    from tgsandbox.cli import app as sandbox_app

    try:
        sandbox_app(args=args.rest, prog_name="tgfleet sandbox")
    except SystemExit as exc:  # typer's standalone mode always ends so
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


# ------------------------------------------------------------------ render
# Thin wrappers: the logic is in controller/deploy.py and controller/k8s.py.


@command(
    "render circus-ini",
    opt("--demo", action="store_true", help="With the sandbox watcher."),
    *UP_OPTIONS,
    opt(
        "--write",
        action="store_true",
        help="Also prepare the home as `tgfleet up` does; say what changed (on stderr).",
    ),
)
def render_circus_ini(args: argparse.Namespace) -> None:
    """Print the circus.ini `tgfleet up` would write (same options and environment)."""
    from controller import deploy
    from controller import up as up_module
    from controller.home import HomeError
    from controller.pg import EmbeddedPgError
    from controller.settings import SettingsError

    try:
        options = up_module.options_from_env(**_up_options(args))
        text, notes = deploy.render_circus_ini_command(options, write=args.write)
    except (up_module.UpError, HomeError, SettingsError, EmbeddedPgError) as exc:
        fail(str(exc))
    sys.stdout.write(text)
    for note in notes:
        echo(note, err=True)


@command(
    "render k8s",
    opt("--bot", help="Only this bot's manifests."),
    opt("--host", help="Only the bots whose host is this (the cluster)."),
    opt(
        "--secrets",
        metavar="FILE",
        help="JSON file: tokens/sessions/api_hash the API never returns.",
    ),
    opt("--image", default="tgfleet:0.1.0", help="The tgfleet image (default tgfleet:0.1.0)."),
    opt("--namespace", help="The namespace of every manifest."),
    opt(
        "--database-secret",
        default="tgfleet-database",
        help="Secret (key 'url') with the controller's DSN (default tgfleet-database).",
    ),
    *API,
)
def render_k8s(args: argparse.Namespace) -> None:
    """Print Kubernetes manifests (JSON documents) for the fleet's bots and controller."""
    from controller import k8s

    options = k8s.K8sOptions(
        image=args.image, namespace=args.namespace, database_secret=args.database_secret
    )
    try:
        text, warnings = k8s.render_k8s(
            lambda path: call(args, "GET", path),
            args.secrets,
            options,
            only=args.bot,
            host=args.host,
        )
    except k8s.K8sRenderError as exc:
        fail(str(exc))
    sys.stdout.write(text)
    for warning in warnings:
        echo(warning, err=True)


# -------------------------------------------------------------- the parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Docstrings keep their line breaks; help columns start further right."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _summary(run: Run) -> str:
    return (run.__doc__ or "").strip().split("\n")[0]


def build_parser() -> argparse.ArgumentParser:
    """`tgfleet`'s parser, from GROUPS and COMMANDS; a leaf's ``args.command`` is its Command."""
    parser = argparse.ArgumentParser(
        prog="tgfleet",
        description="tgfleet: run and keep alive a fleet of Telegram bots under Circus.",
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(parser=parser, command=None)
    tops = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for cmd in COMMANDS:  # listed in the order they were registered
        *group_path, leaf = cmd.path
        into = tops
        if group_path:
            name = group_path[0]
            if name not in groups:
                text = GROUPS[name]
                group = tops.add_parser(
                    name, help=text, description=text, formatter_class=_HelpFormatter
                )
                group.set_defaults(parser=group, command=None)
                groups[name] = group.add_subparsers(title="commands", metavar="COMMAND")
            into = groups[name]
        sub = into.add_parser(
            leaf,
            help=_summary(cmd.run),
            description=cmd.run.__doc__,
            formatter_class=_HelpFormatter,
            add_help=not cmd.passthrough,
        )
        sub.set_defaults(parser=sub, command=cmd)
        if cmd.passthrough:
            sub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        for option in cmd.options:
            sub.add_argument(*option.flags, **option.keywords)
    return parser


def _passthrough(argv: Sequence[str]) -> Command | None:
    for cmd in COMMANDS:
        if cmd.passthrough and tuple(argv[: len(cmd.path)]) == cmd.path:
            return cmd
    return None


def run(argv: Sequence[str] | None = None) -> int:
    """`tgfleet ARGV…`; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    through = _passthrough(argv)
    try:
        if through is not None:
            args = argparse.Namespace(rest=argv[len(through.path) :])
            return through.run(args) or 0
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
            return exc.code if isinstance(exc.code, int) else 2
        if args.command is None:  # `tgfleet`, `tgfleet bots`: what is there to run
            args.parser.print_help()
            return 2
        try:
            return args.command.run(args) or 0
        except UsageError as exc:
            args.parser.print_usage(sys.stderr)
            echo(f"{args.parser.prog}: error: {exc}", err=True)
            return 2
    except Failure as exc:
        echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        echo("Aborted!", err=True)
        return 1


def main() -> NoReturn:
    sys.exit(run())
