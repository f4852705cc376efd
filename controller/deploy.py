"""`tgfleet render circus-ini`: the circus.ini that `tgfleet up` writes, for deploy tools.

Ansible (deploy/ansible/) and a systemd unit run circusd directly on the fleet's
home, so they need what `tgfleet up` prepares before it starts circusd. This
module gives both halves without a second template: ``circus_ini`` renders the
text from ``controller/templates/circus.ini.j2`` and touches nothing (for
``--check --diff``), ``prepare`` writes the home as `tgfleet up` would and says
what it changed (for Ansible's ``changed_when``).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from controller.botusers import service_user_name
from controller.home import Home
from controller.pg import PgWatcher, pgserver_bin_dir
from controller.up import UpOptions, check_options, circus_ini_text, prepare_home


def embedded_pg_watcher(home: Home) -> PgWatcher:
    """The ``postgres`` watcher ``prepare_embedded_pg`` would return, found without
    creating its user, its dirs or its cluster."""
    user = group = None
    if os.geteuid() == 0:  # the fleet's service user runs it (controller.up.prepare_home)
        user = service_user_name(home)
        try:
            group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
        except KeyError:  # not created yet: useradd --user-group names its group after it
            group = user
    return PgWatcher(
        postgres=pgserver_bin_dir() / "postgres",
        data_dir=home.pg_data,
        socket_dir=home.pg_run,
        working_dir=home.pg_dir,
        user=user,
        group=group,
    )


def circus_ini(options: UpOptions) -> str:
    """The text `tgfleet up` would write to ``<home>/circus.ini``; reads, writes nothing."""
    check_options(options)
    pg = None if options.database_url else embedded_pg_watcher(options.home)
    return circus_ini_text(options, pg)


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` changed in the home (empty: it was already right)."""

    changed: tuple[str, ...]
    circus_ini: str


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def prepare(options: UpOptions) -> Prepared:
    """Write the home as `tgfleet up` would before starting circusd (also while the
    fleet runs: nothing that is right is rewritten in a way that changes it)."""
    check_options(options)
    home = options.home
    watched = {
        "circus.ini": home.circus_ini,
        "controller.json": home.controller_json,
        "embedded PostgreSQL cluster": home.pg_data / "PG_VERSION",
    }
    before = {name: _content(path) for name, path in watched.items()}
    existed = home.root.is_dir()
    prepare_home(options)
    changed = [name for name, path in watched.items() if _content(path) != before[name]]
    if not existed:
        changed.insert(0, f"home {home.root}")
    return Prepared(tuple(changed), home.circus_ini.read_text(encoding="utf-8"))


def render_circus_ini_command(options: UpOptions, *, write: bool) -> tuple[str, list[str]]:
    """`tgfleet render circus-ini [--write]`: (stdout, stderr lines)."""
    if not write:
        return circus_ini(options), []
    prepared = prepare(options)
    notes = [f"changed: {name}" for name in prepared.changed] or ["unchanged"]
    return prepared.circus_ini, notes
