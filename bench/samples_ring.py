"""What the dashboard's hour of samples costs the controller per bot (controller/samples.py).

Run: .venv/bin/python bench/samples_ring.py [--bots N]
Fills a ``Samples`` ring for N bots with more than an hour of samples (one every 10 s,
as the controller's sampler does) and prints the memory they hold, from tracemalloc:
the ring keeps 361 samples a bot whatever the fleet's age, so this is its ceiling.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.samples import Sample, Samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bots", type=int, default=100)
    args = parser.parse_args()
    samples = Samples()
    steps = samples.size + 40  # past the ring's size: it has wrapped
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for bot in range(args.bots):
        for step in range(steps):
            samples.add(f"bot-{bot}", Sample(1.8e9 + 10.0 * step, 40.0 + step / 100, step, None))
    after = tracemalloc.take_snapshot()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    kept = len(samples.of("bot-0", 1.8e9 + 10.0 * steps))
    print(f"{args.bots} bots, {samples.size} samples a bot kept ({kept} of the last hour)")
    print(f"held: {held / 2**20:.2f} MB, {held / args.bots / 1024:.1f} KB a bot")


if __name__ == "__main__":
    main()
