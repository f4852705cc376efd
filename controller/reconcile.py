"""Desired state against actual state: a pure plan, tested by table.

``plan(observations)`` looks at each bot's row (desired state, lifecycle state,
generation), what is rendered on disk, what circusd says of its watcher and
what the bot last said on the bus, and returns the actions that close the
difference. The controller's Fleet applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.states import BotState, Trigger, can, transition


@dataclass(frozen=True)
class Rendered:
    """What the files on disk say of a bot: which generation, and whether it should run."""

    generation: int
    autostart: bool


@dataclass(frozen=True)
class Live:
    """What the current process of a bot last said on the bus."""

    pid: int
    generation: int  # -1: not known yet (seen in circusd, not yet heard on the bus)
    ready: bool  # it said ready (or a heartbeat with Telegram connected)
    alive: bool  # the pid still exists
    replaced_pid: int | None = None  # a previous process this one replaced, not yet recorded
    fatal: str | None = None  # Telegram refused the credentials (error name)


@dataclass(frozen=True)
class Observation:
    name: str
    desired: str  # "running" | "stopped"
    state: BotState
    generation: int
    rendered: Rendered | None
    watcher: str | None  # circusd's status of bot-<name>; None when circusd has no such watcher
    live: Live | None
    #: Held by this host but placed on another: stop it here, then let go of it.
    leaving: bool = False


# Actions -------------------------------------------------------------------


@dataclass(frozen=True)
class Render:
    name: str
    autostart: bool


@dataclass(frozen=True)
class Reload:
    """circusd reloadconfig: picks up every rendered file at once."""


@dataclass(frozen=True)
class StartWatcher:
    name: str


@dataclass(frozen=True)
class StopWatcher:
    name: str


@dataclass(frozen=True)
class RemoveOrphan:
    """A watcher file or watcher with no bot row behind it."""

    name: str


@dataclass(frozen=True)
class Release:
    """A bot moved to another host is stopped here: remove its watcher and files, then
    let go of it (the other host may start it only then)."""

    name: str


@dataclass(frozen=True)
class Transition:
    name: str
    trigger: Trigger
    reason: str
    counts_restart: bool = False


Action = Render | Reload | StartWatcher | StopWatcher | RemoveOrphan | Release | Transition


def should_run(desired: str, state: BotState) -> bool:
    """A bot's process should exist: wanted, and not given up on."""
    return desired == "running" and state not in (BotState.FAILED, BotState.DESTROYED)


def _plan_bot(obs: Observation) -> tuple[list[Action], bool]:
    """The actions for one bot, and whether circusd must reload its config."""
    actions: list[Action] = []
    state = obs.state
    live = obs.live

    def move(trigger: Trigger, reason: str, counts_restart: bool = False) -> None:
        nonlocal state
        if can(state, trigger):
            actions.append(Transition(obs.name, trigger, reason, counts_restart))
            state = transition(state, trigger)

    if live is not None and live.fatal and state in (BotState.STARTING, BotState.RUNNING):
        move(Trigger.FAIL, f"Telegram refused the bot's credentials: {live.fatal}")

    run = should_run(obs.desired, state) and not obs.leaving

    if state is BotState.CONFIGURING:
        move(
            Trigger.CONFIGURED_START if run else Trigger.CONFIGURED_IDLE,
            "configuration rendered",
        )
    elif state is BotState.STOPPED and run:
        move(Trigger.START, "desired state is running")
    elif state in (BotState.STARTING, BotState.RUNNING) and not run:
        move(Trigger.STOP, "desired state is stopped")

    if live is not None and state in (BotState.STARTING, BotState.RUNNING):
        current = live.generation == obs.generation
        known = live.generation >= 0  # a process seen only in circusd has not said yet
        if live.replaced_pid is not None:
            move(
                Trigger.RESPAWN,
                f"process {live.replaced_pid} was replaced by {live.pid}",
                counts_restart=True,
            )
        elif state is BotState.RUNNING and not live.alive:
            move(Trigger.RESPAWN, f"process {live.pid} exited", counts_restart=True)
        elif state is BotState.RUNNING and known and not current:
            move(Trigger.RESPAWN, f"restarting for configuration generation {obs.generation}")
        if state is BotState.STARTING and live.alive and live.ready and current:
            move(Trigger.READY, f"process {live.pid} is connected to Telegram")

    gone = live is None or not live.alive
    down = obs.watcher in (None, "stopped") and gone
    if (
        obs.leaving
        and state is BotState.STOPPING
        and down
        and obs.rendered == Rendered(obs.generation, False)
    ):
        move(Trigger.STOPPED, "process stopped")  # and let go of it in the same pass
    settled = state in (BotState.STOPPED, BotState.FAILED) and obs.watcher in (None, "stopped")
    if obs.leaving and settled and gone:
        actions.append(Release(obs.name))
        return actions, True  # the reload drops its watcher

    want = Rendered(obs.generation, run)
    reload = False
    if obs.rendered != want:
        actions.append(Render(obs.name, run))
        reload = True
    elif obs.watcher is None:
        reload = True
    elif run and obs.watcher == "stopped":
        actions.append(StartWatcher(obs.name))
    elif not run and obs.watcher == "active":
        actions.append(StopWatcher(obs.name))

    if state is BotState.STOPPING and not run and not reload and obs.watcher != "active":
        move(Trigger.STOPPED, "process stopped")
    return actions, reload


def plan(observations: Sequence[Observation], orphans: Sequence[str] = ()) -> list[Action]:
    """Every action that brings the fleet to its desired state, Reload at most once, last."""
    actions: list[Action] = []
    reload = False
    for obs in observations:
        bot_actions, bot_reload = _plan_bot(obs)
        actions.extend(bot_actions)
        reload = reload or bot_reload
    for name in orphans:
        actions.append(RemoveOrphan(name))
        reload = True
    if reload:
        # Start/stop commands refer to watchers that exist before the reload, so they
        # go first; the reload then applies every rendered change in one command.
        actions.sort(key=lambda a: isinstance(a, Render | RemoveOrphan | Release))
        actions.append(Reload())
    return actions
