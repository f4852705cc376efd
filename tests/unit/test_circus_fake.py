"""FakeSupervisor behaves like circusd where the reconciler can tell."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.circus import CircusError, FakeSupervisor, Supervisor, WatcherNotFound
from controller.home import Home
from controller.render import BotWatcher, render_watcher

HOME = Home(Path("/srv/fleet"))
PY = "/usr/bin/python3"


def ini(name: str, autostart: bool = True, memory_limit_mb: int = 128) -> str:
    return render_watcher(HOME, BotWatcher(name, autostart, memory_limit_mb), python=PY)


async def test_reload_adds_changes_and_removes_like_circusd() -> None:
    fake = FakeSupervisor(
        {"keep.ini": ini("keep"), "change.ini": ini("change"), "gone.ini": ini("gone")},
        fixed={"controller": "active"},
    )
    supervisor: Supervisor = fake
    await supervisor.reloadconfig()
    assert await supervisor.status() == {
        "bot-change": "active",
        "bot-gone": "active",
        "bot-keep": "active",
        "controller": "active",
    }
    before = {
        name: await supervisor.pids(name) for name in ("bot-keep", "bot-change", "controller")
    }

    fake.files["change.ini"] = ini("change", memory_limit_mb=256)
    fake.files["added.ini"] = ini("added", autostart=False)
    del fake.files["gone.ini"]
    await supervisor.reloadconfig()

    status = await supervisor.status()
    assert status == {
        "bot-added": "stopped",
        "bot-change": "active",
        "bot-keep": "active",
        "controller": "active",
    }
    assert await supervisor.pids("bot-keep") == before["bot-keep"]
    assert await supervisor.pids("controller") == before["controller"]
    assert await supervisor.pids("bot-change") != before["bot-change"]
    assert await supervisor.pids("bot-added") == []


async def test_lifecycle_and_recorded_calls() -> None:
    fake = FakeSupervisor({"a.ini": ini("a", autostart=False)})
    await fake.reloadconfig()
    await fake.start("bot-a")
    (first,) = await fake.pids("bot-a")
    await fake.restart("bot-a")
    (second,) = await fake.pids("bot-a")
    assert second != first
    assert fake.crash("bot-a") != second
    await fake.stop("bot-a")
    assert (await fake.status())["bot-a"] == "stopped"
    assert fake.calls == [
        ("reloadconfig",),
        ("start", "bot-a"),
        ("pids", "bot-a"),
        ("restart", "bot-a"),
        ("pids", "bot-a"),
        ("stop", "bot-a"),
        ("status",),
    ]


async def test_unknown_watcher_and_injected_failure() -> None:
    fake = FakeSupervisor()
    with pytest.raises(WatcherNotFound):
        await fake.start("bot-x")
    fake.fail_next("reloadconfig", CircusError("reloadconfig", "arbiter is already running x", 5))
    with pytest.raises(CircusError):
        await fake.reloadconfig()
    await fake.reloadconfig()  # only the next one failed


async def test_reads_a_bots_d_dir(tmp_path: Path) -> None:
    (tmp_path / "a.ini").write_text(ini("a"))
    (tmp_path / "notes.txt").write_text("not a watcher")
    fake = FakeSupervisor(bots_d=tmp_path)
    await fake.reloadconfig()
    assert await fake.status() == {"bot-a": "active"}
    (tmp_path / "a.ini").unlink()
    await fake.reloadconfig()
    assert await fake.status() == {}
