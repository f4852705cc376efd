"""The last hour of each bot's memory and message counters, for the dashboard's chart.

Nothing else stores these over time (PostgreSQL keeps events, not gauges; Prometheus
is the place for long histories), so the controller keeps a bounded ring per bot in
its memory: ``keep_s / every_s`` samples, lost when it restarts. Pure: the sampler
task that fills it lives in controller/dashboard.py.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from math import isnan, nan
from typing import Any

MB = 1 / 2**20
#: Where a bot's API view holds each figure: paths tried in order, each with the
#: factor that turns it into the figure's unit (``resources`` and ``messages`` are
#: the per-bot readings of issue #12). None where the view has none of them.
FIGURE_PATHS: dict[str, tuple[tuple[tuple[str, ...], float], ...]] = {
    "rss_mb": ((("rss_mb",), 1.0), (("resources", "rss_bytes"), MB)),
    "messages_in": ((("messages", "received"), 1.0),),
    "messages_out": ((("messages", "sent"), 1.0),),
}


def figure(view: Mapping[str, Any], name: str) -> float | None:
    """A number from a bot's API view by its figure name, or None when it has none."""
    for path, factor in FIGURE_PATHS[name]:
        value: Any = view
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) * factor
    return None


@dataclass(frozen=True)
class Sample:
    at: float  # wall time, seconds
    rss_mb: float | None
    messages_in: float | None
    messages_out: float | None

    @classmethod
    def of(cls, at: float, view: Mapping[str, Any]) -> Sample:
        return cls(
            at, figure(view, "rss_mb"), figure(view, "messages_in"), figure(view, "messages_out")
        )


def per_minute(earlier: float | None, later: float | None, seconds: float) -> float | None:
    """A counter's rate between two samples; a counter that went down was reset by a
    new process, which counted ``later`` since (a lower bound)."""
    if earlier is None or later is None or seconds <= 0:
        return None
    grown = later - earlier if later >= earlier else later
    return round(grown * 60.0 / seconds, 2)


def series(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """Points for the chart: time, memory, and messages per minute since the previous."""
    points: list[dict[str, Any]] = []
    previous: Sample | None = None
    for sample in samples:
        seconds = sample.at - previous.at if previous is not None else 0.0
        points.append(
            {
                "at": sample.at,
                "rss_mb": sample.rss_mb,
                "in_per_min": None
                if previous is None
                else per_minute(previous.messages_in, sample.messages_in, seconds),
                "out_per_min": None
                if previous is None
                else per_minute(previous.messages_out, sample.messages_out, seconds),
            }
        )
        previous = sample
    return points


#: Doubles per sample in a ring: at, rss_mb, messages_in, messages_out (NaN: None).
_FIELDS = 4


class _Ring:
    """One bot's newest ``size`` samples, as doubles in one array: 32 bytes a sample,
    where a ``Sample`` and its floats cost 170-200 (an hour of them, 361, was 62-75 KB
    a bot: up to 7 MB of the controller at 100 bots; bench/samples_ring.py)."""

    __slots__ = ("_count", "_next", "_values")

    def __init__(self, size: int) -> None:
        self._values = array("d", bytes(8 * _FIELDS * size))
        self._next = 0  # the slot the next sample goes to
        self._count = 0

    def append(self, sample: Sample) -> None:
        size = len(self._values) // _FIELDS
        base = self._next * _FIELDS
        self._values[base : base + _FIELDS] = array(
            "d",
            (
                sample.at,
                *(
                    nan if value is None else value
                    for value in (sample.rss_mb, sample.messages_in, sample.messages_out)
                ),
            ),
        )
        self._next = (self._next + 1) % size
        self._count = min(self._count + 1, size)

    def __iter__(self) -> Iterator[Sample]:
        """Oldest first."""
        size = len(self._values) // _FIELDS
        for index in range(self._next - self._count, self._next):
            base = (index % size) * _FIELDS
            at, *figures = self._values[base : base + _FIELDS]
            yield Sample(at, *(None if isnan(v) else v for v in figures))


@dataclass
class Samples:
    """A ring of samples per bot: the newest ``keep_s`` seconds at one per ``every_s``."""

    every_s: float = 10.0
    keep_s: float = 3600.0
    _rings: dict[str, _Ring] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.keep_s / self.every_s) + 1

    def add(self, name: str, sample: Sample) -> None:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = _Ring(self.size)
        ring.append(sample)

    def of(self, name: str, now: float) -> list[Sample]:
        """A bot's samples of the last ``keep_s`` seconds, oldest first."""
        return [s for s in self._rings.get(name, ()) if s.at >= now - self.keep_s]

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget bots that no longer exist."""
        known = set(names)
        for name in [n for n in self._rings if n not in known]:
            del self._rings[name]
