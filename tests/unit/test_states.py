import pytest

from controller.states import TRANSITIONS, BotState, InvalidTransition, Trigger, can, transition

S, T = BotState, Trigger


@pytest.mark.parametrize(
    ("state", "trigger", "after"),
    [
        (S.CONFIGURING, T.CONFIGURED_START, S.STARTING),
        (S.CONFIGURING, T.CONFIGURED_IDLE, S.STOPPED),
        (S.STARTING, T.READY, S.RUNNING),
        (S.RUNNING, T.STOP, S.STOPPING),
        (S.STOPPING, T.STOPPED, S.STOPPED),
        (S.STARTING, T.FAIL, S.FAILED),
        (S.RUNNING, T.FAIL, S.FAILED),
        (S.FAILED, T.START, S.STARTING),
        (S.FAILED, T.DESTROY, S.DESTROYED),
        (S.STOPPED, T.DESTROY, S.DESTROYED),
        (S.RUNNING, T.RESPAWN, S.STARTING),
        (S.STOPPED, T.START, S.STARTING),
    ],
)
def test_allowed_transitions(state: BotState, trigger: Trigger, after: BotState) -> None:
    assert transition(state, trigger) is after


@pytest.mark.parametrize(
    ("state", "trigger"),
    [
        (S.RUNNING, T.DESTROY),
        (S.STARTING, T.DESTROY),
        (S.STOPPED, T.READY),
        (S.DESTROYED, T.START),
        (S.STOPPING, T.START),
        (S.CONFIGURING, T.READY),
    ],
)
def test_refused_transitions(state: BotState, trigger: Trigger) -> None:
    assert not can(state, trigger)
    with pytest.raises(InvalidTransition, match=str(state)):
        transition(state, trigger)


def test_destroyed_is_final() -> None:
    assert not [edge for edge in TRANSITIONS if edge[0] is S.DESTROYED]


def test_every_state_but_destroyed_can_leave() -> None:
    leaving = {state for state, _ in TRANSITIONS}
    assert leaving == set(BotState) - {S.DESTROYED}
