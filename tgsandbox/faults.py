"""Fault injection, decided purely: which faults are set, and what they mean for an account.

Faults are set per target (``all`` or one account id) and act on the real connections
(see ``server``): ``refuse`` closes new connections, ``blackhole`` swallows everything,
``delay`` holds every answer, ``flood`` answers sendMessage with FLOOD_WAIT, ``revoke``
makes the account's keys and token invalid. ``close`` is a one-shot action, ``clear``
removes faults. A ``blackhole`` with scope ``live`` is one-shot too: it silences the
connections open now (a TCP connection that died silently) and leaves new ones alone;
the server marks those connections, so it never stands on the board.
All live in memory: a sandbox restart clears them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

ALL = "all"
MAX_DELAY_MS = 600_000
MAX_FLOOD_S = 86_400


class FaultKind(enum.StrEnum):
    REFUSE = "refuse"
    CLOSE = "close"
    BLACKHOLE = "blackhole"
    DELAY = "delay"
    FLOOD = "flood"
    REVOKE = "revoke"
    CLEAR = "clear"


class Scope(enum.StrEnum):
    """Which connections a blackhole swallows: every one, new ones too, or those open now."""

    ALL = "all"
    LIVE = "live"


# Kinds that stay in force until cleared (close and clear are actions).
STANDING = (
    FaultKind.REFUSE,
    FaultKind.BLACKHOLE,
    FaultKind.DELAY,
    FaultKind.FLOOD,
    FaultKind.REVOKE,
)


class InvalidFault(Exception):
    """A fault request is malformed; ``errors`` maps each bad field to why."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    ms: int | None = None
    seconds: int | None = None
    scope: Scope | None = None

    @property
    def live(self) -> bool:
        """A blackhole of the connections open now only (an action, never standing)."""
        return self.kind is FaultKind.BLACKHOLE and self.scope is Scope.LIVE

    @classmethod
    def parse(
        cls, kind: str, ms: object = None, seconds: object = None, scope: object = None
    ) -> Fault:
        """Validate a fault request (kind; ms for delay, seconds for flood, scope for
        blackhole only; a blackhole's scope defaults to ``all``)."""
        errors: dict[str, str] = {}
        try:
            fault_kind = FaultKind(kind)
        except ValueError:
            errors["kind"] = f"must be one of {', '.join(k.value for k in FaultKind)}"
            raise InvalidFault(errors) from None
        if fault_kind is FaultKind.DELAY:
            if not _is_int(ms) or not 1 <= ms <= MAX_DELAY_MS:  # type: ignore[operator]
                errors["ms"] = f"delay needs ms, an integer from 1 to {MAX_DELAY_MS}"
        elif ms is not None:
            errors["ms"] = "only the delay fault takes ms"
        if fault_kind is FaultKind.FLOOD:
            if not _is_int(seconds) or not 1 <= seconds <= MAX_FLOOD_S:  # type: ignore[operator]
                errors["seconds"] = f"flood needs seconds, an integer from 1 to {MAX_FLOOD_S}"
        elif seconds is not None:
            errors["seconds"] = "only the flood fault takes seconds"
        fault_scope: Scope | None = None
        if fault_kind is FaultKind.BLACKHOLE:
            if scope is None:
                fault_scope = Scope.ALL
            elif isinstance(scope, str) and scope in {s.value for s in Scope}:
                fault_scope = Scope(scope)
            else:
                errors["scope"] = f"one of {', '.join(s.value for s in Scope)}"
        elif scope is not None:
            errors["scope"] = "only the blackhole fault takes scope"
        if errors:
            raise InvalidFault(errors)
        return cls(
            fault_kind,
            ms if fault_kind is FaultKind.DELAY else None,  # type: ignore[arg-type]
            seconds if fault_kind is FaultKind.FLOOD else None,  # type: ignore[arg-type]
            fault_scope,
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Effect:
    """What the standing faults mean for one connection's account (None: unknown yet)."""

    refuse: bool = False
    blackhole: bool = False
    delay_ms: int = 0
    flood_s: int | None = None
    revoked: bool = False


@dataclass
class FaultBoard:
    """Standing faults by target: ``all`` or an account id."""

    _faults: dict[str | int, dict[FaultKind, Fault]] = field(default_factory=dict)

    def set(self, target: str | int, fault: Fault) -> None:
        if fault.kind is FaultKind.CLEAR:
            self.clear(target)
        elif fault.kind in STANDING and not fault.live:
            self._faults.setdefault(target, {})[fault.kind] = fault

    def clear(self, target: str | int) -> None:
        """Clear a target's faults; clearing ``all`` clears every target's."""
        if target == ALL:
            self._faults.clear()
        else:
            self._faults.pop(target, None)

    def listing(self) -> dict[str | int, list[Fault]]:
        return {t: list(f.values()) for t, f in self._faults.items() if f}

    def effect(self, account_id: int | None) -> Effect:
        merged: dict[FaultKind, Fault] = dict(self._faults.get(ALL, {}))
        if account_id is not None:
            for kind, fault in self._faults.get(account_id, {}).items():
                merged[kind] = fault
        if not merged:
            return NO_EFFECT
        delay = merged.get(FaultKind.DELAY)
        flood = merged.get(FaultKind.FLOOD)
        return Effect(
            refuse=FaultKind.REFUSE in merged,
            blackhole=FaultKind.BLACKHOLE in merged,
            delay_ms=delay.ms or 0 if delay else 0,
            flood_s=flood.seconds if flood else None,
            revoked=FaultKind.REVOKE in merged,
        )


NO_EFFECT = Effect()
