"""The bot state machine: a pure transition table (the seed's states)."""

from __future__ import annotations

from enum import StrEnum

from controller.errors import Conflict


class BotState(StrEnum):
    CONFIGURING = "configuring"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DESTROYED = "destroyed"


class Trigger(StrEnum):
    """What makes a bot change state."""

    CONFIGURED_START = "configured_start"  # files rendered, process asked to start
    CONFIGURED_IDLE = "configured_idle"  # files rendered, autostart off
    START = "start"  # operator start or reconciler bringing a watcher up
    READY = "ready"  # the bot said ready / heartbeat with Telegram connected
    RESPAWN = "respawn"  # the process exited or was restarted; a new one is coming
    STOP = "stop"
    STOPPED = "stopped"  # the watcher has no process any more
    FAIL = "fail"
    DESTROY = "destroy"


class InvalidTransition(Conflict):
    """The table has no such edge: asked of the API, a 409 problem."""

    def __init__(self, state: BotState, trigger: Trigger) -> None:
        super().__init__(f"a bot that is {state} cannot {trigger.replace('_', ' ')}")
        self.state = state
        self.trigger = trigger


S, T = BotState, Trigger

TRANSITIONS: dict[tuple[BotState, Trigger], BotState] = {
    (S.CONFIGURING, T.CONFIGURED_START): S.STARTING,
    (S.CONFIGURING, T.CONFIGURED_IDLE): S.STOPPED,
    (S.CONFIGURING, T.FAIL): S.FAILED,
    (S.STARTING, T.READY): S.RUNNING,
    (S.STARTING, T.RESPAWN): S.STARTING,
    (S.STARTING, T.STOP): S.STOPPING,
    (S.STARTING, T.FAIL): S.FAILED,
    (S.RUNNING, T.RESPAWN): S.STARTING,
    (S.RUNNING, T.STOP): S.STOPPING,
    (S.RUNNING, T.FAIL): S.FAILED,
    (S.STOPPING, T.STOPPED): S.STOPPED,
    (S.STOPPED, T.START): S.STARTING,
    (S.FAILED, T.START): S.STARTING,
    (S.FAILED, T.STOP): S.STOPPED,
    (S.FAILED, T.DESTROY): S.DESTROYED,
    (S.STOPPED, T.DESTROY): S.DESTROYED,
}


def transition(state: BotState, trigger: Trigger) -> BotState:
    """The state after ``trigger`` in ``state``; InvalidTransition if the table has no edge."""
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise InvalidTransition(state, trigger) from None


def can(state: BotState, trigger: Trigger) -> bool:
    return (state, trigger) in TRANSITIONS
