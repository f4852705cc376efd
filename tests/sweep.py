"""Looking for secrets where they must not be: process lists, environments, files, answers.

A secret is looked for as written and in the forms that would hide it from a plain
search: URL-quoted, JSON-escaped (``\\/`` and ``\\uXXXX`` cannot occur in a token or a
session string, so the raw form covers JSON), and, for a bot token, its secret part
alone (``<bot id>:<secret>``: the id is public, the part after the colon is the key).
A long secret (a session string) is also looked for by overlapping slices, so that a
cut line or a repr that wraps it is still found.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_TOKEN = re.compile(r"^(\d+):([A-Za-z0-9_-]{8,})$")
#: Long enough to be distinctive, short enough to survive truncation.
SLICE = 40


@dataclass(frozen=True)
class Secret:
    """One secret to look for, with a label that says which it is (never its value)."""

    label: str
    value: str

    def needles(self) -> tuple[bytes, ...]:
        forms = {self.value, urllib.parse.quote(self.value, safe="")}
        token = _TOKEN.fullmatch(self.value)
        if token:
            forms.add(token.group(2))
        elif len(self.value) > 2 * SLICE:
            # Every window of SLICE characters, half a window apart: any piece of
            # 1.5 * SLICE characters or more holds one of them whole.
            for start in range(0, len(self.value) - SLICE + 1, SLICE // 2):
                forms.add(self.value[start : start + SLICE])
        return tuple(sorted(form.encode() for form in forms))


@dataclass(frozen=True)
class Place:
    """Something looked into: where it was, and what it held."""

    where: str
    content: bytes


def found(secrets: Iterable[Secret], places: Iterable[Place]) -> list[str]:
    """Every (secret, place) where one of the secret's forms occurs: '<label> in <where>'."""
    secrets = list(secrets)
    hits = []
    for place in places:
        for secret in secrets:
            if any(needle in place.content for needle in secret.needles()):
                hits.append(f"{secret.label} in {place.where}")
    return hits


def process_list() -> Place:
    """What `ps` shows of every process on the machine: pid, user and full command line."""
    shown = subprocess.run(
        ["ps", "-e", "-ww", "-o", "pid=,user=,args="],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    return Place("ps -e", shown)


def environments(pids: Iterable[int]) -> Iterator[Place]:
    """The environment of each process (``/proc/PID/environ``); gone ones are skipped."""
    for pid in sorted(set(pids)):
        try:
            content = Path(f"/proc/{pid}/environ").read_bytes()
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile (a launcher, a respawned bot)
        yield Place(f"the environment of pid {pid} ({name})", content)


def files_under(root: Path, *, except_for: Iterable[Path] = ()) -> Iterator[Place]:
    """Every regular file under ``root`` (symlinks, sockets and ``except_for`` skipped)."""
    skipped = {Path(path) for path in except_for}
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = Path(top) / file
            if path in skipped or path.is_symlink() or not path.is_file():
                continue
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                continue  # rotated or removed while we walked (a log, a PostgreSQL temp file)
            yield Place(str(path), content)


def command_output(argv: list[str]) -> Place:
    done = subprocess.run(argv, capture_output=True, timeout=60, check=True)
    return Place(" ".join(argv), done.stdout + done.stderr)
