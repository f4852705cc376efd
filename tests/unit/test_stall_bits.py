"""Small pieces of the stalled-database work: errors, the webhook URL in logs, settings."""

from __future__ import annotations

import pytest

from controller.app import redact_url
from controller.errors import Conflict
from controller.settings import ControllerSettings, SettingsError, env_number
from controller.states import BotState, InvalidTransition, Trigger, transition


def test_an_invalid_transition_is_a_conflict() -> None:
    with pytest.raises(Conflict) as refused:
        transition(BotState.STOPPED, Trigger.READY)
    assert isinstance(refused.value, InvalidTransition)
    assert refused.value.status == 409
    assert refused.value.detail == "a bot that is stopped cannot ready"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/services/T000/B000/XXXXSECRET", "https://hooks.example.com/…"),
        ("http://user:pw@127.0.0.1:8080/hook?token=abc", "http://127.0.0.1:8080/…"),
        ("https://example.com", "https://example.com"),
        ("https://example.com/?key=s3cret", "https://example.com/…"),
    ],
)
def test_the_webhook_url_is_logged_without_its_secret(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "SECRET" not in redact_url(url) and "pw" not in redact_url(url)


def test_settings_refuse_a_timeout_out_of_range() -> None:
    with pytest.raises(SettingsError, match="database_timeout_s"):
        ControllerSettings("127.0.0.1:1", "postgresql://x", database_timeout_s=0).check()
    ControllerSettings("127.0.0.1:1", "postgresql://x").check()


def test_numbers_from_the_environment() -> None:
    assert env_number({}, "X", 2.0) == 2.0
    assert env_number({"X": " 1.5 "}, "X", 2.0) == 1.5
    with pytest.raises(SettingsError, match="X must be a number"):
        env_number({"X": "soon"}, "X", 2.0)
