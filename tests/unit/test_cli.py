"""The CLI's own logic (everything it does over HTTP is tested end to end)."""

import pytest

from controller.cli import new_lines, parse_settings


@pytest.mark.parametrize(
    ("seen", "latest", "new"),
    [
        (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),
        (["a", "b"], ["a", "b"], []),
        ([], ["a"], ["a"]),
        (["x", "y"], ["p", "q"], ["p", "q"]),
        (["a", "a"], ["a", "a", "a"], ["a"]),
    ],
)
def test_follow_prints_only_new_log_lines(
    seen: list[str], latest: list[str], new: list[str]
) -> None:
    assert new_lines(seen, latest) == new


def test_settings_values_are_json_when_they_can_be() -> None:
    assert parse_settings(["greeting=hi", "n=3", "on=true", "l=[1]", "s=a=b"]) == {
        "greeting": "hi",
        "n": 3,
        "on": True,
        "l": [1],
        "s": "a=b",
    }
