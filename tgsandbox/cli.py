"""``tgfleet sandbox``: serve the local Telegram, or talk to a running one's admin API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

from .admin_client import DEFAULT_ADMIN, AdminClient, AdminError
from .server import ServerConfig
from .service import Address, serve_forever

DEFAULT_LISTEN = "127.0.0.1:8711"
T = TypeVar("T")

app = typer.Typer(
    help="The local Telegram (MTProto sandbox). With no subcommand it serves.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
bot_app = typer.Typer(help="Sandbox bots.", no_args_is_help=True)
app.add_typer(bot_app, name="bot")

ListenOpt = Annotated[
    str,
    typer.Option(
        "--listen", envvar="TGFLEET_SANDBOX_LISTEN", help="MTProto HOST:PORT (served as DC 2)."
    ),
]
AdminListenOpt = Annotated[
    str,
    typer.Option("--admin-listen", envvar="TGFLEET_SANDBOX_ADMIN", help="Admin API HOST:PORT."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Data dir (public.pem, state); default <home>/sandbox."),
]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="TGFLEET_HOME", help="tgfleet home dir.")
]
AdminOpt = Annotated[
    str,
    typer.Option("--admin", envvar="TGFLEET_SANDBOX_ADMIN", help="Admin API of the sandbox."),
]


def _fail(message: str) -> NoReturn:
    print(f"tgfleet sandbox: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _serve(listen: str, admin_listen: str, data: Path | None, home: Path | None) -> None:
    try:
        mtproto, admin = Address.parse(listen), Address.parse(admin_listen)
    except ValueError as exc:
        _fail(str(exc))
    if data is None:
        chosen = home if home is not None else Path(os.environ.get("TGFLEET_HOME", ".tgfleet"))
        data = chosen.expanduser().resolve() / "sandbox"
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s sandbox %(levelname)s %(message)s",
    )
    config = ServerConfig(data_dir=data, host=mtproto.host, port=mtproto.port)
    try:
        asyncio.run(serve_forever(config, admin))
    except OSError as exc:
        _fail(f"cannot serve on {mtproto} / {admin}: {exc}")


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    listen: ListenOpt = DEFAULT_LISTEN,
    admin_listen: AdminListenOpt = DEFAULT_ADMIN,
    data: DataOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the sandbox in the foreground (SIGTERM/SIGINT stop it) unless a subcommand is given."""
    if ctx.invoked_subcommand is None:
        _serve(listen, admin_listen, data, home)


@app.command("serve")
def serve(
    listen: ListenOpt = DEFAULT_LISTEN,
    admin_listen: AdminListenOpt = DEFAULT_ADMIN,
    data: DataOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the sandbox in the foreground."""
    _serve(listen, admin_listen, data, home)


def _with_admin(address: str, action: Callable[[AdminClient], Awaitable[T]]) -> T:
    async def run() -> T:
        async with AdminClient(address) as admin:
            return await action(admin)

    try:
        return asyncio.run(run())
    except AdminError as exc:
        _fail(str(exc))
    except TimeoutError as exc:
        _fail(str(exc))


@bot_app.command("create")
def bot_create(
    name: Annotated[str, typer.Argument(help="Bot name; its username is NAME_bot.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {id, name, username, token}.")
    ] = False,
    admin: AdminOpt = DEFAULT_ADMIN,
) -> None:
    """Create a bot and print its token."""
    bot = _with_admin(admin, lambda a: a.create_bot(name))
    if as_json:
        print(
            json.dumps(
                {"id": bot.id, "name": bot.name, "username": bot.username, "token": bot.token}
            )
        )
    else:
        print(bot.token)


@bot_app.command("list")
def bot_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
    admin: AdminOpt = DEFAULT_ADMIN,
) -> None:
    """List the sandbox's bots."""
    bots = _with_admin(admin, lambda a: a.list_bots())
    if as_json:
        print(
            json.dumps(
                [
                    {"id": b.id, "name": b.name, "username": b.username, "token": b.token}
                    for b in bots
                ]
            )
        )
        return
    for b in bots:
        print(f"{b.name}\t@{b.username}\t{b.token}")


@app.command("fault")
def fault(
    name: Annotated[str, typer.Argument(help="Bot name, user:<name>, or 'all'.")],
    kind: Annotated[
        str, typer.Argument(help="refuse, close, blackhole, delay, flood, revoke or clear.")
    ],
    ms: Annotated[int | None, typer.Option("--ms", help="Delay in ms (delay).")] = None,
    seconds: Annotated[
        int | None, typer.Option("--seconds", help="FloodWait seconds (flood).")
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live", help="Blackhole only the connections open now; new ones are served."
        ),
    ] = False,
    admin: AdminOpt = DEFAULT_ADMIN,
) -> None:
    """Inject (or clear) a fault on a bot's connections."""
    scope = "live" if live else None
    result = _with_admin(
        admin, lambda a: a.set_fault(name, kind, ms=ms, seconds=seconds, scope=scope)
    )
    what = f"{result['kind']} (live)" if result.get("scope") == "live" else result["kind"]
    print(f"{what} on {result['target']} ({result['connections']} live connection(s))")


@app.command("send")
def send(
    username: Annotated[str, typer.Argument(help="The bot's username, e.g. echo_bot.")],
    text: Annotated[str, typer.Argument(help="The message.")],
    user: Annotated[str, typer.Option("--user", help="Simulated user's name.")] = "newcomer",
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the reply.")] = 10.0,
    admin: AdminOpt = DEFAULT_ADMIN,
) -> None:
    """Send TEXT to a bot as a simulated user and print the bot's reply."""
    username = username.lstrip("@")

    async def exchange(a: AdminClient) -> str:
        sent = await a.send_as_user(user, username, text)
        reply = await a.wait_for_reply(user, username, after_id=sent.id, timeout_s=wait)
        return reply.text

    print(_with_admin(admin, exchange))
