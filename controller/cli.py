"""The `tgfleet` command. Everything but `up` talks to the HTTP API."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NoReturn

import typer

from controller.access import SCOPES, parse_duration
from controller.client import ApiClient, ApiError, ApiUnreachable
from controller.home import Home, HomeError
from controller.settings import (
    DEFAULT_LISTEN,
    DEFAULT_SANDBOX_ADMIN,
    DEFAULT_SANDBOX_LISTEN,
    ControllerSettings,
)

app = typer.Typer(
    help="tgfleet: run and keep alive a fleet of Telegram bots under Circus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bots = typer.Typer(help="Create, change, start, stop and destroy bots.", no_args_is_help=True)
tokens = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(bots, name="bots")
app.add_typer(tokens, name="token")
secrets_app = typer.Typer(help="The key that seals secrets in the database.", no_args_is_help=True)
app.add_typer(secrets_app, name="secret")

HomeOpt = Annotated[
    str | None, typer.Option("--home", help="State dir (default $TGFLEET_HOME or ./.tgfleet).")
]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API URL (default from the home dir).")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--api-token", help="API token (default $TGFLEET_TOKEN or <home>/admin.token)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def call(
    home: str | None,
    api: str | None,
    token: str | None,
    method: str,
    path: str,
    body: object | None = None,
) -> Any:
    client = ApiClient.discover(Home.resolve(home), api, token)
    try:
        return client.request(method, path, body)
    except ApiError as exc:
        lines = [f"error: {exc} (HTTP {exc.status})"]
        for item in exc.problem.get("errors", []):
            lines.append(f"  {item.get('field') or '(body)'}: {item.get('message')}")
        typer.echo("\n".join(lines), err=True)
        raise typer.Exit(1) from None
    except ApiUnreachable as exc:
        fail(str(exc))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def bot_row(bot: dict[str, Any]) -> list[str]:
    telegram = bot.get("telegram") or {}
    return [
        bot["name"],
        bot["state"],
        str(bot["pid"] or "-"),
        _age(bot.get("uptime_s")),
        str(bot["restarts"]),
        f"{bot['rss_mb']:.0f} MB" if bot.get("rss_mb") is not None else "-",
        "yes" if telegram.get("connected") else "no",
    ]


BOT_HEADER = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "RSS", "TELEGRAM"]


def show(result: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif text is not None:
        typer.echo(text)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that is valid JSON is taken as JSON (numbers, true, lists)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--setting")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


# --------------------------------------------------------------------- up


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option("--demo", help="Also run the local Telegram sandbox with demo bots.")
    ] = False,
    home: HomeOpt = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="API HOST:PORT (default $TGFLEET_LISTEN or 127.0.0.1:8710)."),
    ] = None,
    tls_cert: Annotated[
        str | None, typer.Option("--tls-cert", help="Serve the API over HTTPS with this PEM cert.")
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option("--tls-key", help="The private key (PEM) of --tls-cert.")
    ] = None,
    insecure_listen: Annotated[
        bool,
        typer.Option(
            "--insecure-listen", help="Allow plain HTTP on a non-loopback --listen (not advised)."
        ),
    ] = False,
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="This controller's host name (default $TGFLEET_HOST or the machine's)."
        ),
    ] = None,
) -> None:
    """Run the fleet in the foreground: circusd, PostgreSQL, controller, bots. Ctrl-C stops it all."""
    from controller import up as up_module
    from controller.pg import EmbeddedPgError
    from controller.settings import (
        DEFAULT_AUTH_FAILURE_LIMIT,
        DEFAULT_DATABASE_TIMEOUT_S,
        DEFAULT_EVENT_RETENTION_COUNT,
        DEFAULT_EVENT_RETENTION_DAYS,
        SettingsError,
        env_number,
    )

    try:
        resolved = Home.resolve(home)
        options = up_module.UpOptions(
            home=resolved,
            listen=listen or os.environ.get("TGFLEET_LISTEN", DEFAULT_LISTEN),
            demo=demo,
            database_url=os.environ.get("TGFLEET_DATABASE_URL") or None,
            sandbox_listen=os.environ.get("TGFLEET_SANDBOX_LISTEN", DEFAULT_SANDBOX_LISTEN),
            sandbox_admin=os.environ.get("TGFLEET_SANDBOX_ADMIN", DEFAULT_SANDBOX_ADMIN),
            webhook_url=os.environ.get("TGFLEET_WEBHOOK_URL") or None,
            plugin_path=tuple(
                entry for entry in os.environ.get("TGFLEET_PLUGIN_PATH", "").split(":") if entry
            ),
            database_timeout_s=env_number(
                os.environ, "TGFLEET_DATABASE_TIMEOUT_S", DEFAULT_DATABASE_TIMEOUT_S
            ),
            event_retention_days=env_number(
                os.environ, "TGFLEET_EVENT_RETENTION_DAYS", DEFAULT_EVENT_RETENTION_DAYS
            ),
            event_retention_count=int(
                env_number(
                    os.environ, "TGFLEET_EVENT_RETENTION_COUNT", DEFAULT_EVENT_RETENTION_COUNT
                )
            ),
            auth_failure_limit=int(
                env_number(os.environ, "TGFLEET_AUTH_FAILURE_LIMIT", DEFAULT_AUTH_FAILURE_LIMIT)
            ),
            tls_cert=os.path.abspath(tls_cert) if tls_cert else None,
            tls_key=os.path.abspath(tls_key) if tls_key else None,
            insecure_listen=insecure_listen,
            host=host or os.environ.get("TGFLEET_HOST") or None,
            forget_after_s=env_number(os.environ, "TGFLEET_HOST_FORGET_AFTER_S", 60.0),
        )
        warning = up_module.insecure_listen_warning(options)
        if warning is not None and insecure_listen:
            typer.echo(warning, err=True)

        def on_ready(settings: ControllerSettings) -> None:
            bin_dir = os.path.dirname(sys.executable)
            typer.echo(
                "\n".join(
                    [
                        f"tgfleet is up in {resolved.root}",
                        f"  API:       {settings.api_url}  (token in {resolved.admin_token})",
                        f"  bots:      {bin_dir}/tgfleet bots list",
                        f"  circus:    {bin_dir}/circusctl --endpoint {resolved.circus_endpoint} status",
                        f"  logs:      {resolved.logs_dir}",
                        "  Ctrl-C stops everything.",
                    ]
                )
            )
            if demo:
                from controller.demo import show_demo

                show_demo(resolved, settings, typer.echo)

        code = up_module.run(options, typer.echo, on_ready)
    except (up_module.UpError, HomeError, SettingsError, EmbeddedPgError) as exc:
        fail(str(exc))
    raise typer.Exit(code)


# ------------------------------------------------------------------- bots


@bots.command("list")
def bots_list(
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Every bot: state, pid, uptime, restarts, memory, Telegram connection."""
    result = call(home, api, token, "GET", "/api/v1/bots")
    rows = [bot_row(b) for b in result["bots"]]
    show(
        result,
        as_json,
        table(rows, BOT_HEADER) if rows else "no bots yet: tgfleet bots create NAME --token …",
    )


@bots.command("show")
def bots_show(
    name: str,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One bot in full."""
    bot = call(home, api, token, "GET", f"/api/v1/bots/{name}")
    lines = [
        table([bot_row(bot)], BOT_HEADER),
        "",
        f"desired: {bot['desired']}   since: {bot['since']}",
    ]
    if bot.get("reason"):
        lines.append(f"reason:  {bot['reason']}")
    lines.append("spec:    " + json.dumps(bot["spec"], sort_keys=True))
    show(bot, as_json, "\n".join(lines))


def _spec_from_options(
    token_value: str | None,
    session: str | None,
    plugin: list[str] | None,
    setting: list[str] | None,
    memory_limit: int | None,
    spec_file: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if spec_file:
        try:
            with open(spec_file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(
                f"cannot read {spec_file}: {exc}", param_hint="--spec-file"
            ) from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter(
                f"{spec_file} must hold a JSON object", param_hint="--spec-file"
            )
        body.update(loaded)
    if token_value is not None:
        body["token"] = token_value
    if session is not None:
        body["session"] = session
    if plugin:
        body["plugins"] = plugin
    if setting:
        body["settings"] = parse_settings(setting)
    if memory_limit is not None:
        body["memory_limit_mb"] = memory_limit
    return body


BotTokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="The bot's Telegram token (from @BotFather or the sandbox)."),
]
SessionOpt = Annotated[
    str | None, typer.Option("--session", help="A Telethon string session (user account).")
]
PluginOpt = Annotated[
    list[str] | None, typer.Option("--plugin", help="module:function (repeatable).")
]
SettingOpt = Annotated[
    list[str] | None, typer.Option("--setting", help="key=value for plugins (repeatable).")
]
MemoryOpt = Annotated[int | None, typer.Option("--memory-limit", help="Memory limit in MB.")]
SpecFileOpt = Annotated[
    str | None, typer.Option("--spec-file", help="JSON file with more spec fields.")
]


@bots.command("create")
def bots_create(
    name: str,
    bot_token: BotTokenOpt = None,
    session: SessionOpt = None,
    plugin: PluginOpt = None,
    setting: SettingOpt = None,
    memory_limit: MemoryOpt = None,
    no_autostart: Annotated[
        bool, typer.Option("--no-autostart", help="Create it stopped.")
    ] = False,
    spec_file: SpecFileOpt = None,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a bot (and start it unless --no-autostart)."""
    body = {
        "name": name,
        **_spec_from_options(bot_token, session, plugin, setting, memory_limit, spec_file),
    }
    if no_autostart:
        body["autostart"] = False
    bot = call(home, api, token, "POST", "/api/v1/bots", body)
    show(bot, as_json, f"created {bot['name']}: {bot['state']}")


@bots.command("update")
def bots_update(
    name: str,
    bot_token: BotTokenOpt = None,
    session: SessionOpt = None,
    plugin: PluginOpt = None,
    setting: SettingOpt = None,
    memory_limit: MemoryOpt = None,
    spec_file: SpecFileOpt = None,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a bot (settings merge key by key); that bot alone restarts."""
    body = _spec_from_options(bot_token, session, plugin, setting, memory_limit, spec_file)
    if not body:
        raise typer.BadParameter(
            "give at least one change (--setting, --plugin, --memory-limit, …)"
        )
    bot = call(home, api, token, "PATCH", f"/api/v1/bots/{name}", body)
    show(bot, as_json, f"updated {bot['name']}: {bot['state']} (generation {bot['generation']})")


def _lifecycle(op: str) -> None:
    def command(
        name: str,
        home: HomeOpt = None,
        api: ApiOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        bot = call(home, api, token, "POST", f"/api/v1/bots/{name}/{op}")
        show(bot, as_json, f"{bot['name']}: {bot['state']}")

    command.__doc__ = f"{op.capitalize()} a bot."
    bots.command(op)(command)


for _op in ("start", "stop", "restart"):
    _lifecycle(_op)


@bots.command("destroy")
def bots_destroy(
    name: str,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a bot and remove its watcher, files and private dir (its events stay)."""
    result = call(home, api, token, "DELETE", f"/api/v1/bots/{name}")
    show(result, as_json, f"destroyed {name}")


@bots.command("logs")
def bots_logs(
    name: str,
    stream: Annotated[
        str, typer.Option("--stream", help="err (default: Telethon and tgfleet logs) or out.")
    ] = "err",
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines.")] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The tail of a bot's log."""
    result = call(
        home, api, token, "GET", f"/api/v1/bots/{name}/logs?stream={stream}&lines={lines}"
    )
    show(result, as_json, "\n".join(result["lines"]))
    seen = result["lines"]
    while follow:
        time.sleep(1)
        path = f"/api/v1/bots/{name}/logs?stream={stream}&lines=200"
        latest = call(home, api, token, "GET", path)["lines"]
        for line in new_lines(seen, latest):
            typer.echo(line)
        seen = latest


def new_lines(seen: list[str], latest: list[str]) -> list[str]:
    """The lines of the log's latest tail that come after the tail seen before."""
    for overlap in range(min(len(seen), len(latest)), 0, -1):
        if seen[-overlap:] == latest[:overlap]:
            return latest[overlap:]
    return latest  # nothing in common (rotated, or more new lines than a tail holds)


@bots.command("events")
def bots_events(
    name: str,
    limit: Annotated[int, typer.Option("--limit", help="How many (oldest first).")] = 100,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A bot's event history: who changed what, when and why."""
    result = call(home, api, token, "GET", f"/api/v1/bots/{name}/events?limit={limit}")
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
    show(result, as_json, table(rows, ["AT", "KIND", "STATE", "ACTOR", "REASON"]))


# ----------------------------------------------------------------- status


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


@app.command()
def status(
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """The fleet at a glance."""
    summary = call(home, api, token, "GET", "/api/v1/status")
    listing = call(home, api, token, "GET", "/api/v1/bots")
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items())) or "no bots"
    text = [
        f"bots: {summary['bots']} ({states}); Telegram connected: {summary['telegram_connected']}",
        f"controller: pid {summary['controller']['pid']}, {summary['controller']['rss_mb']} MB",
    ]
    text.append(database_line(summary["database"]))
    if summary.get("reconcile_error"):
        text.append(f"last reconcile error: {summary['reconcile_error']}")
    if listing["bots"]:
        text += ["", table([bot_row(b) for b in listing["bots"]], BOT_HEADER)]
    show({**summary, "bot_list": listing["bots"]}, as_json, "\n".join(text))


# ----------------------------------------------------------------- tokens


ScopeOpt = Annotated[
    str,
    typer.Option(
        "--scope",
        help="read (every GET; the default: least privilege), operate (also "
        "start/stop/restart/publish) or admin (everything).",
    ),
]


@tokens.command("create")
def token_create(
    name: str,
    scope: ScopeOpt = "read",
    expires_in: Annotated[
        str | None,
        typer.Option("--expires-in", help="It stops working after this: 90s, 15m, 12h, 30d, 2w."),
    ] = None,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new API token; its secret is printed once."""
    if scope not in SCOPES:
        fail(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    body: dict[str, Any] = {"name": name, "scope": scope}
    if expires_in is not None:
        try:
            seconds = parse_duration(expires_in)
        except ValueError as exc:
            fail(f"--expires-in: {exc}")
        body["expires_at"] = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    result = call(home, api, token, "POST", "/api/v1/tokens", body)
    show(result, as_json, result["token"])


@tokens.command("list")
def token_list(
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """API tokens (names, scopes and dates, never secrets)."""
    result = call(home, api, token, "GET", "/api/v1/tokens")
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
    show(result, as_json, table(rows, header))


@tokens.command("revoke")
def token_revoke(
    name: str,
    home: HomeOpt = None,
    api: ApiOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API token."""
    result = call(home, api, token, "DELETE", f"/api/v1/tokens/{name}")
    show(result, as_json, f"revoked {name}")


@secrets_app.command("rotate")
def secret_rotate(
    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Seal every stored secret with a new key (<home>/secret.key), or with the first key
    of TGFLEET_SECRET_KEY when the controller's key comes from there."""
    result = call(home, api, token, "POST", "/api/v1/secrets/rotate")
    show(
        result,
        as_json,
        f"sealed {result['rewritten']} rows again; the key is in {result['key_source']}",
    )


# ---------------------------------------------------------------- sandbox


@app.command(
    "sandbox",
    # Every argument, --help included, belongs to the sandbox's own CLI.
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def sandbox(ctx: typer.Context) -> None:
    """The local Telegram (MTProto sandbox): serve it, or drive a running one (see --help)."""
    # Imported only here: the sandbox's code (Telethon, aiohttp, cryptography) would
    # cost every other command its import time, and it is an optional extra.
    import tgsandbox

    problem = tgsandbox.requirements_problem()
    if problem is not None:
        fail(problem)
    from tgsandbox.cli import app as sandbox_app

    sandbox_app(args=ctx.args, prog_name=ctx.command_path)


def main() -> None:
    app()
