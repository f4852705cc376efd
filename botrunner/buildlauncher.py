"""Compile ``tgf-launcher`` (botrunner/launcher.c) beside this file, or where told.

Run: ``python -m botrunner.buildlauncher [--if-stale] [OUT]``. setup.py compiles it
into the wheel; scripts/_venv.sh into a checkout (``--if-stale``: only when the
source is newer than the binary). The compiler is ``$CC``, else ``cc``; the binary
needs libc only. Where there is no compiler, nothing is built (a warning says so) and
the fleet runs botrunner/launcher.py instead (controller/watchercheck.py,
``launcher_command``): ~3 MB more per fork-mode bot. A compiler that fails is an error.

Standard library only: setup.py runs this file before tgfleet is installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("launcher.c")
NAME = "tgf-launcher"
FLAGS = ("-O2", "-s", "-Wall", "-Wextra", "-std=gnu11")


#: What a build without a compiler says (here, and setup.py's).
NO_COMPILER = (
    f"warning: no C compiler (cc): {NAME} not built; fork-mode bots run "
    "botrunner/launcher.py, ~3 MB more each\n"
)


def compiler() -> list[str] | None:
    """The C compiler's command line: ``$CC``, else ``cc``; None when there is no
    ``cc``. A ``$CC`` that names no program is an error (FileNotFoundError), not a
    build without the launcher."""
    given = os.environ.get("CC", "").strip()
    command = shlex.split(given or "cc")
    if command and shutil.which(command[0]):
        return command
    if given:
        raise FileNotFoundError(f"CC={given!r}: no such program")
    return None


def compile_launcher(out: Path, source: Path = SOURCE) -> Path:
    """``out``, built from ``source``; CalledProcessError/OSError when it cannot be (a
    compiler that fails is an error: only its absence is not)."""
    command = compiler()
    if command is None:
        raise FileNotFoundError(f"no C compiler ({os.environ.get('CC') or 'cc'})")
    partial = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        subprocess.run([*command, *FLAGS, "-o", str(partial), str(source)], check=True)
        partial.chmod(0o755)  # run by every bot's own user
        partial.replace(out)  # whole or not at all: a running fleet may start it now
    finally:
        partial.unlink(missing_ok=True)
    return out


def stale(out: Path, source: Path = SOURCE) -> bool:
    try:
        return out.stat().st_mtime < source.stat().st_mtime
    except FileNotFoundError:
        return True


def main(argv: list[str]) -> int:
    if_stale = "--if-stale" in argv
    rest = [arg for arg in argv if arg != "--if-stale"]
    if len(rest) > 1:
        sys.stderr.write("usage: python -m botrunner.buildlauncher [--if-stale] [OUT]\n")
        return 64
    out = Path(rest[0]) if rest else SOURCE.with_name(NAME)
    if if_stale and not stale(out):
        return 0
    if compiler() is None:
        sys.stderr.write(NO_COMPILER)
        return 0
    compile_launcher(out)
    print(f"built {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
