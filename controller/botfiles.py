"""A bot's files on disk: its private dir, config.json (secrets) and Circus watcher file."""

from __future__ import annotations

import logging
import re
import resource
from collections.abc import Sequence
from dataclasses import replace

from botspec import forked
from botspec.config import BotConfig, RuntimeTelegram, dump
from botspec.procinfo import ProcSample
from botspec.spec import process_health
from controller.botusers import BotUsers
from controller.buskeys import BusKeys, IssuedKey
from controller.home import Home
from controller.keeper import KeeperRefused, for_fleet
from controller.reconcile import Rendered
from controller.render import BotWatcher, LogRotation, render_watcher
from controller.spec import EffectiveSpec

log = logging.getLogger(__name__)

# The user is in the mark so that a file rendered for another user (before an
# upgrade that brought a user per bot) is rendered again, which restarts the bot; so
# is the bus socket (home-relative), which the config names: a config from before
# the bus moved to run/bus/ is written again, and its bot restarted.
_MARK = re.compile(
    r"^# tgfleet: generation=(\d+) autostart=(true|false) user=(\S+) bus=(\S+)$", re.M
)
_FLEET_USER = "-"


def runtime_config(
    home: Home, name: str, generation: int, spec: EffectiveSpec, bus_key: IssuedKey
) -> BotConfig:
    """The bot process's config.json (declared in botspec.config).

    Refuses (ValueError) a spec without api_id/api_hash: check_runnable keeps
    such specs out of the store, so this only guards against a bypass."""
    if spec.telegram.api_id is None or spec.telegram.api_hash is None:
        raise ValueError(f"bot {name!r} has no telegram.api_id/api_hash")
    return BotConfig(
        name=name,
        generation=generation,
        data_dir=str(home.bot_dir(name)),
        bus_endpoint=home.bus_endpoint,
        bus_secret_key=bus_key.secret_key,
        bus_server_key=bus_key.server_key,
        token=spec.token,
        session=spec.session,
        plugins=spec.plugins,
        settings=spec.settings,
        telegram=RuntimeTelegram(
            api_id=spec.telegram.api_id,
            api_hash=spec.telegram.api_hash,
            server=spec.telegram.server,
        ),
        health=process_health(spec.health),
        subscribe=spec.subscribe,
        graceful_timeout_s=spec.graceful_timeout_s,
    )


class BotFiles:
    """Writes, reads back and removes what a bot needs on disk (its bus key included),
    owned by the bot's user."""

    def __init__(
        self,
        home: Home,
        python: str,
        keys: BusKeys,
        *,
        users: BotUsers | None = None,
        plugin_path: Sequence[str] = (),
        log: LogRotation | None = None,
    ) -> None:
        self.home = home
        self.log = log if log is not None else LogRotation()
        self.python = python
        self.keys = keys
        self.users = users if users is not None else BotUsers(home, enabled=False)
        # As the service user of a fleet run as root: the keeper, in circusd.
        self.privileged = for_fleet(self.users, python)
        self.plugin_path = tuple(plugin_path)
        self._rendered: dict[str, Rendered] = {}

    def write(self, name: str, generation: int, spec: EffectiveSpec, autostart: bool) -> None:
        account = self.privileged.ensure_user(name)
        # The dir and what is in it are the bot's user's (a dir written before the bot
        # had a user of its own holds root's files: its session among them).
        self.privileged.own_dir(name)
        # Each write gives the bot a new bus key pair (the keyring still accepts the
        # previous one, for the process running until the reload restarts it).
        config = runtime_config(self.home, name, generation, spec, self.keys.issue(name))
        self.privileged.write_config(name, dump(config).decode())
        bot = BotWatcher(
            name=name,
            autostart=autostart,
            memory_limit_mb=spec.memory_limit_mb,
            graceful_timeout_s=spec.graceful_timeout_s,
            generation=generation,
            bus_key_id=self.keys.server_key_id,
            open_files=_open_files(spec.limits.open_files),
            processes=spec.limits.processes if account is not None else None,
            user=account.user if account is not None else None,
            group=account.group if account is not None else None,
            launch=spec.launch,
        )
        watcher = render_watcher(
            self.home, bot, python=self.python, pythonpath=self.plugin_path, log=self.log
        )
        user = account.user if account is not None else _FLEET_USER
        header = (
            f"# tgfleet: generation={generation} autostart={str(autostart).lower()} "
            f"user={user} bus={self._bus}\n"
        )
        self.privileged.write_watcher(name, header + watcher)
        self._rendered[name] = Rendered(generation, autostart)

    @property
    def _bus(self) -> str:
        return str(self.home.bus_socket.relative_to(self.home.root))

    def rendered(self, name: str) -> Rendered | None:
        """What is on disk for this bot, read once and then remembered; None also
        when the bot has no bus key (files from before the bus had keys)."""
        if not self.keys.has(name):
            return None
        if name not in self._rendered:
            path = self.home.watcher_file(name)
            try:
                found = _MARK.search(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            user = self.users.user_name(name) or _FLEET_USER
            if (
                found is None
                or found.group(3) != user
                or found.group(4) != self._bus
                or not self.privileged.has_config(name)
            ):
                return None
            self._rendered[name] = Rendered(int(found.group(1)), found.group(2) == "true")
        return self._rendered[name]

    def fill_usage(
        self, samples: dict[str, ProcSample | None], pss: bool
    ) -> dict[str, ProcSample | None]:
        """``samples`` with the open files (and, with ``pss``, the PSS) that this process
        could not read: as the service user, another user's ``/proc/PID/fd`` and
        ``smaps_rollup`` are the keeper's to read (one request for every bot). Blocking."""
        missing = {n: s.pid for n, s in samples.items() if s is not None and s.open_files is None}
        if not missing:
            return samples
        try:
            found = self.privileged.usage(missing, pss)
        except KeeperRefused as exc:  # the keeper is away (circusd restarting): next pass
            log.warning("no open files and PSS of %d bots this pass: %s", len(missing), exc)
            return samples
        filled = dict(samples)
        for name, (open_files, pss_bytes) in found.items():
            sample = filled.get(name)
            if sample is not None:
                filled[name] = replace(
                    sample, open_files=open_files, pss_bytes=pss_bytes or sample.pss_bytes
                )
        return filled

    def process_pid(self, name: str, watcher_pid: int) -> int:
        """The bot's own pid, given its watcher's (a fork-mode watcher runs a launcher)."""
        return forked.bot_pid(self.home.run_dir, name, watcher_pid)

    def on_disk(self) -> list[str]:
        """Names of every bot with a watcher file."""
        return sorted(p.stem for p in self.home.bots_d.glob("*.ini"))

    def remove_watcher(self, name: str) -> None:
        self.privileged.remove_watcher(name)
        self._rendered.pop(name, None)

    def remove_private(self, name: str) -> None:
        """The bot is destroyed: its dir and config go, its bus keys are forgotten, and
        its user: a later bot of that name inherits nothing."""
        self.keys.forget(name)
        self.privileged.remove_dir(name)
        self.privileged.remove_user(name)


def _open_files(wanted: int) -> int:
    """RLIMIT_NOFILE for the bot, capped at the fleet's own hard limit: past it circusd
    fails in the child before exec, and in circus 0.19 that failed spawn also fails the
    reloadconfig that started it, so every later pass of the whole fleet. Root is no
    exception: without CAP_SYS_RESOURCE (a container, systemd's LimitNOFILE) it cannot
    raise a hard limit either."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
