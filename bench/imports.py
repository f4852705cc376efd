"""What importing costs each kind of tgfleet process: import time and resident memory.

Run: .venv/bin/python bench/imports.py [--runs N]

Each entry is a fresh interpreter that imports what that process imports at
start (the controller's app, a bot's runner, the CLI's entry point), then reports
its VmRSS. Time is the wall time of the whole interpreter (start, imports, exit),
median of --runs, with a bare interpreter's time shown for reference. Also the
cost of the validation library alone (msgspec), to compare with pydantic when
it happens to be installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import time

PROCESSES = {
    "bare python": "pass",
    "controller (controller.app)": "import controller.app",
    # The process itself (python -m controller): aiohttp imported without the CA bundle.
    "controller (its __main__)": "import controller.__main__",
    # What a controller with bots does besides: render a watcher, seal and open a secret
    # (Jinja2 for the watcher; no cryptography, no psutil: tests/unit/test_imports.py).
    "controller, a watcher and a secret": (
        "import controller.app\nfrom pathlib import Path\nfrom controller.home import Home\n"
        "from controller.render import BotWatcher, render_watcher\n"
        "from controller.secretbox import SecretBox, new_key\n"
        "render_watcher(Home(Path('/srv/f')), BotWatcher('a', True, 256), python='/bin/py')\n"
        "box = SecretBox((new_key(),), 'x')\nbox.open(box.seal('1:abc'))"
    ),
    "bot (botrunner.runner)": "import botrunner.runner",
    "bot config parse (botspec)": "import botspec.config",
    "CLI (controller.cli)": "import controller.cli",
    # The libraries alone, each validating one small declared object (pydantic
    # builds its core lazily: a bare import would hide most of its cost).
    "msgspec (one Struct)": (
        "import msgspec\nclass A(msgspec.Struct):\n    x: int = 1\n"
        "msgspec.json.decode(b'{\"x\": 2}', type=A)"
    ),
    "pydantic (one model)": (
        "import pydantic\nclass A(pydantic.BaseModel):\n    x: int = 1\n"
        "A.model_validate_json(b'{\"x\": 2}')"
    ),
    # Fernet on top of what the controller has anyway (ssl, hmac): ours (ctypes on
    # Python's libcrypto) against cryptography's, each sealing and opening a token.
    "ssl + hmac (the baseline)": "import ssl, hmac",
    "ssl + hmac + ctypes": "import ssl, hmac, ctypes",
    "ssl + hmac + our Fernet": (
        "import ssl, hmac\nfrom controller import fernet\n"
        "k = fernet.FernetKey.parse(fernet.generate_key())\nfernet.decrypt([k], fernet.encrypt(k, b'x'))"
    ),
    "ssl + hmac + cryptography Fernet": (
        "import ssl, hmac\nimport cryptography.fernet as f\n"
        "k = f.Fernet(f.Fernet.generate_key())\nk.decrypt(k.encrypt(b'x'))"
    ),
}

REPORT_RSS = (
    "\nfor _line in open('/proc/self/status'):\n"
    "    if _line.startswith('VmRSS:'):\n"
    "        print(int(_line.split()[1]))\n"
)


def available(code: str) -> bool:
    """Every module ``code`` imports is installed."""
    modules = [
        name.split(" as ")[0].strip()
        for statement in re.findall(r"^(?:import|from) ([\w., ]+?)(?: import .*)?$", code, re.M)
        for name in statement.split(",")
    ]
    try:
        return all(importlib.util.find_spec(module) is not None for module in modules)
    except ImportError:
        return False


def measure(code: str, runs: int) -> tuple[float, float]:
    """(median wall ms, RSS MB) of a fresh interpreter running ``code``."""
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        walls.append((time.perf_counter() - started) * 1000)
    out = subprocess.run(
        [sys.executable, "-c", code + REPORT_RSS], check=True, capture_output=True, text=True
    ).stdout
    return statistics.median(walls), int(out.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"{'process':32s} {'wall ms':>8s} {'RSS MB':>7s}")
    for label, code in PROCESSES.items():
        if not available(code):
            print(f"{label:32s} {'(not installed)':>16s}")
            continue
        wall, rss = measure(code, args.runs)
        print(f"{label:32s} {wall:8.0f} {rss:7.1f}")


if __name__ == "__main__":
    main()
