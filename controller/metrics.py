"""Prometheus text exposition (format 0.0.4), written here rather than with prometheus_client.

prometheus_client costs a bare interpreter 12 MB RSS and 113 modules (bench/observe.py);
the few families the controller exposes need ~100 lines. The tests parse what this
writes with prometheus_client's own parser (a test extra only).

Labels stay bounded: a bot's name, and small fixed sets (state, failure kind,
refusal reason, route of the API's own table).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]
Labels = tuple[tuple[str, str], ...]

#: Buckets of request and reconcile durations, seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    """A sample value as the text format writes it."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


@dataclass
class Family:
    """One metric: its HELP, TYPE and samples (``suffix`` is ``_bucket`` and the like)."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        """A sample; None (not known) leaves the series out."""
        if value is not None:
            self.samples.append(("", tuple(labels.items()), value))

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            inside = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels)
            shown = f"{{{inside}}}" if inside else ""
            out.append(f"{self.name}{suffix}{shown} {number(value)}")
        return out


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families`` (each name once, in order)."""
    lines: list[str] = []
    for family in families:
        lines += family.lines()
    return "\n".join(lines) + "\n"


class Histogram:
    """Observations in cumulative buckets, as a Prometheus histogram (one label set per key)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = DURATION_BUCKETS):
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets))
        # key: label values → (counts per bucket, +Inf last), sum
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(labels.items())
        counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def family(self) -> Family:
        family = Family(self.name, "histogram", self.help)
        for key, (counts, total) in self._series.items():
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                family.samples.append(("_bucket", (*key, ("le", number(bound))), running))
            family.samples.append(("_sum", key, total[0]))
            family.samples.append(("_count", key, running))
        return family
