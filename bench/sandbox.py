"""Benchmark of the local Telegram: bots held, user→bot→user round trips per second, RSS.

Runs the sandbox as its own process (as Circus does), real Telethon bot clients in a
second process, and simulated users through the admin API in this one. Prints figures;
not a pass/fail test.

    .venv/bin/python bench/sandbox.py [--bots 100] [--echo-bots 10] [--users 40] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import psutil
from _fleet import Sandbox, short_tmpdir, wait_for_async

from tgsandbox.admin_client import AdminClient, AdminError


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def wait_healthy(admin: AdminClient, timeout: float = 30.0) -> None:
    await wait_for_async(
        "the sandbox's admin API", admin.health, timeout, 0.1, ignoring=(AdminError,)
    )


async def run_bots(
    port: int, pem: str, tokens: list[str], echo: bool, ready: Event, stop: Event
) -> None:
    import telethon.crypto.rsa
    from telethon import TelegramClient, events
    from telethon.sessions import MemorySession

    telethon.crypto.rsa.add_key(pem, old=False)
    clients: list[TelegramClient] = []
    limit = asyncio.Semaphore(10)

    async def start(token: str) -> None:
        client = TelegramClient(MemorySession(), api_id=1, api_hash="sandbox")
        client.session.set_dc(2, "127.0.0.1", port)
        if echo:

            @client.on(events.NewMessage(incoming=True))  # type: ignore[untyped-decorator]
            async def answer(event: events.NewMessage.Event) -> None:
                await event.respond(event.raw_text)

        async with limit:
            await asyncio.wait_for(client.start(bot_token=token), 60)
        clients.append(client)

    await asyncio.gather(*(start(t) for t in tokens))
    ready.set()
    await asyncio.to_thread(stop.wait)
    for client in clients:
        await client.disconnect()


def bots_process(
    port: int, pem: str, tokens: list[str], echo: bool, ready: Event, stop: Event
) -> None:
    """The bots' own process: the sandbox is not measured with the bots' CPU."""
    asyncio.run(run_bots(port, pem, tokens, echo, ready, stop))


def start_bots(
    port: int, pem: str, tokens: list[str], *, echo: bool
) -> tuple[multiprocessing.process.BaseProcess, Event, Event]:
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=bots_process, args=(port, pem, tokens, echo, ready, stop))
    proc.start()
    return proc, ready, stop


async def round_trips(
    admin: AdminClient, usernames: list[str], users: int, seconds: float
) -> tuple[int, float]:
    done = 0
    deadline = time.monotonic() + seconds

    async def user_loop(index: int) -> None:
        nonlocal done
        name = f"bench{index}"
        bot = usernames[index % len(usernames)]
        while time.monotonic() < deadline:
            sent = await admin.send_as_user(name, bot, f"ping {index} {done}")
            await admin.wait_for_reply(name, bot, after_id=sent.id, timeout_s=30)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(user_loop(i) for i in range(users)))
    return done, time.monotonic() - started


async def measure(
    args: argparse.Namespace, data: Path, port: int, admin_port: int, pid: int
) -> None:
    admin = AdminClient(f"127.0.0.1:{admin_port}", timeout_s=60)
    try:
        await wait_healthy(admin)
        pem = (data / "public.pem").read_text()
        print(f"sandbox pid {pid}: idle RSS {rss_mb(pid):.1f} MB")

        # 1. Bots held.
        bots = [await admin.create_bot(f"held{i}") for i in range(args.bots)]
        started = time.monotonic()
        proc, ready, stop = start_bots(port, pem, [b.token for b in bots], echo=False)
        if not await asyncio.to_thread(ready.wait, 180):
            raise SystemExit("bots did not all log in within 180 s")
        held = (await admin.health())["connections"]
        print(
            f"bots held: {held} connected of {args.bots} "
            f"(all logged in after {time.monotonic() - started:.1f} s); "
            f"sandbox RSS {rss_mb(pid):.1f} MB"
        )
        stop.set()
        await asyncio.to_thread(proc.join, 60)

        # 2. Round trips user -> bot -> user.
        echo = [await admin.create_bot(f"echo{i}") for i in range(args.echo_bots)]
        proc, ready, stop = start_bots(port, pem, [b.token for b in echo], echo=True)
        if not await asyncio.to_thread(ready.wait, 120):
            raise SystemExit("echo bots did not log in within 120 s")
        usernames = [b.username for b in echo]
        await round_trips(admin, usernames, args.users, 1.0)  # warm-up
        done, elapsed = await round_trips(admin, usernames, args.users, args.seconds)
        print(
            f"round trips user->bot->user at {args.echo_bots} bots, {args.users} users: "
            f"{done / elapsed:.0f}/s ({done} in {elapsed:.1f} s); "
            f"sandbox RSS {rss_mb(pid):.1f} MB"
        )
        stop.set()
        await asyncio.to_thread(proc.join, 60)
    finally:
        await admin.close()


def main(args: argparse.Namespace) -> None:
    root = short_tmpdir("sbxbench")
    sandbox = Sandbox.start(root / "sandbox")  # as its own process, as Circus runs it
    try:
        asyncio.run(measure(args, sandbox.data, sandbox.port, sandbox.admin_port, sandbox.proc.pid))
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)
        print(f"sandbox exit code {sandbox.proc.returncode}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=100)
    parser.add_argument("--echo-bots", type=int, default=10)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10.0)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(parser.parse_args())
