import pytest

from controller.reconcile import (
    Live,
    Observation,
    Reload,
    RemoveOrphan,
    Render,
    Rendered,
    StartWatcher,
    StopWatcher,
    Transition,
    plan,
)
from controller.states import BotState, Trigger

S, T = BotState, Trigger


HEALTHY = Live(pid=10, generation=1, ready=True, alive=True)
RENDERED = Rendered(1, True)


def obs(
    state: BotState = S.RUNNING,
    desired: str = "running",
    generation: int = 1,
    rendered: Rendered | None = RENDERED,
    watcher: str | None = "active",
    live: Live | None = HEALTHY,
) -> Observation:
    return Observation("a", desired, state, generation, rendered, watcher, live)


def triggers(actions: list[object]) -> list[Trigger]:
    return [a.trigger for a in actions if isinstance(a, Transition)]


def test_healthy_running_bot_needs_nothing() -> None:
    assert plan([obs()]) == []


def test_new_bot_is_rendered_started_and_reloaded_once() -> None:
    actions = plan([obs(S.CONFIGURING, rendered=None, watcher=None, live=None)])
    assert triggers(actions) == [T.CONFIGURED_START]
    assert Render("a", True) in actions
    assert actions[-1] == Reload()
    assert actions.count(Reload()) == 1


def test_new_bot_without_autostart_is_rendered_stopped() -> None:
    actions = plan([obs(S.CONFIGURING, desired="stopped", rendered=None, watcher=None, live=None)])
    assert triggers(actions) == [T.CONFIGURED_IDLE]
    assert Render("a", False) in actions


def test_ready_message_makes_starting_bot_running() -> None:
    assert triggers(plan([obs(S.STARTING)])) == [T.READY]


def test_ready_of_an_older_generation_does_not_count() -> None:
    actions = plan([obs(S.STARTING, generation=2, rendered=Rendered(2, True))])
    assert triggers(actions) == []


def test_spec_change_rerenders_and_marks_respawn() -> None:
    actions = plan([obs(S.RUNNING, generation=2)])
    assert Render("a", True) in actions
    assert triggers(actions) == [T.RESPAWN]
    assert actions[-1] == Reload()


def test_dead_process_is_a_counted_respawn() -> None:
    actions = plan([obs(live=Live(10, 1, ready=True, alive=False))])
    assert actions == [Transition("a", T.RESPAWN, "process 10 exited", counts_restart=True)]


def test_replaced_process_that_is_ready_again_is_respawn_then_ready() -> None:
    live = Live(11, 1, ready=True, alive=True, replaced_pid=10)
    actions = plan([obs(live=live)])
    assert triggers(actions) == [T.RESPAWN, T.READY]
    assert actions[0] == Transition(
        "a", T.RESPAWN, "process 10 was replaced by 11", counts_restart=True
    )


def test_fatal_credentials_fail_the_bot_and_stop_its_watcher() -> None:
    live = Live(10, 1, ready=False, alive=True, fatal="ACCESS_TOKEN_INVALID")
    actions = plan([obs(S.STARTING, live=live)])
    assert triggers(actions) == [T.FAIL]
    assert Render("a", False) in actions


def test_failed_bot_stays_down() -> None:
    actions = plan([obs(S.FAILED, rendered=Rendered(1, False), watcher="stopped", live=None)])
    assert actions == []


def test_stop_request_rerenders_without_autostart() -> None:
    actions = plan([obs(S.RUNNING, desired="stopped")])
    assert triggers(actions) == [T.STOP]
    assert Render("a", False) in actions


def test_stopping_bot_becomes_stopped_when_watcher_is_down() -> None:
    actions = plan(
        [obs(S.STOPPING, desired="stopped", rendered=Rendered(1, False), watcher="stopped")]
    )
    assert triggers(actions) == [T.STOPPED]


@pytest.mark.parametrize(
    ("state", "desired", "rendered", "watcher", "expected"),
    [
        (S.RUNNING, "running", Rendered(1, True), "stopped", StartWatcher("a")),
        (S.FAILED, "running", Rendered(1, False), "active", StopWatcher("a")),
        (S.RUNNING, "running", Rendered(1, True), None, Reload()),
    ],
)
def test_watcher_drift_is_corrected(
    state: BotState, desired: str, rendered: Rendered, watcher: str | None, expected: object
) -> None:
    assert expected in plan([obs(state, desired, rendered=rendered, watcher=watcher)])


def test_stopped_bot_asked_to_run_starts() -> None:
    actions = plan([obs(S.STOPPED, rendered=Rendered(1, False), watcher="stopped", live=None)])
    assert triggers(actions) == [T.START]
    assert Render("a", True) in actions


def test_orphans_are_removed_with_one_reload() -> None:
    actions = plan([obs()], orphans=["gone", "old"])
    assert actions == [RemoveOrphan("gone"), RemoveOrphan("old"), Reload()]


def test_watcher_commands_come_before_the_reload() -> None:
    a = obs(S.RUNNING, rendered=Rendered(1, True), watcher="stopped")
    b = Observation("b", "running", S.CONFIGURING, 1, None, None, None)
    actions = plan([b, a])
    assert actions.index(StartWatcher("a")) < actions.index(Render("b", True))
    assert actions[-1] == Reload()


def test_a_process_not_heard_from_yet_is_left_alone() -> None:
    seen_in_circus_only = Live(pid=10, generation=-1, ready=False, alive=True)
    assert (
        plan([obs(S.RUNNING, generation=3, rendered=Rendered(3, True), live=seen_in_circus_only)])
        == []
    )
