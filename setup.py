"""The one build step pyproject.toml cannot say: tgf-launcher, the launcher in C.

Each fork-mode bot's watcher runs a launcher (botrunner/launcher.c): built here into
the wheel (which is then tagged for this platform), it costs a bot ~0.2 MB instead of
the ~3 MB of a Python one. Without a C compiler the wheel is pure Python
(py3-none-any), without it, and the fleet runs botrunner/launcher.py instead (README,
"launch: fork"); a compiler that fails fails the build.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
# Run as a file: botrunner's package is not importable before it is installed.
_BUILD: dict[str, Any] = runpy.run_path(str(ROOT / "botrunner" / "buildlauncher.py"))


#: Without a C compiler the wheel is pure Python (py3-none-any) and has no launcher.
COMPILER = _BUILD["compiler"]()


class BuildPyWithLauncher(build_py):
    def run(self) -> None:
        super().run()
        if COMPILER is None:
            sys.stderr.write(_BUILD["NO_COMPILER"])
            return
        # An editable install runs the checkout's files: the launcher goes beside them.
        target = ROOT / "botrunner" if self.editable_mode else Path(self.build_lib) / "botrunner"
        target.mkdir(parents=True, exist_ok=True)
        _BUILD["compile_launcher"](target / _BUILD["NAME"])  # a compiler that fails: an error


class WithBinary(Distribution):
    """Not pure where the launcher is built: the wheel holds a binary (platlib)."""

    def has_ext_modules(self) -> bool:
        return COMPILER is not None


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the launcher is a binary; Python code runs on any 3.11+."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform  # "any" for a wheel without the launcher


setup(
    distclass=WithBinary, cmdclass={"build_py": BuildPyWithLauncher, "bdist_wheel": PlatformWheel}
)
