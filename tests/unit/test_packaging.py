"""pyproject.toml against the code: what an install brings is what the code imports."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import tgsandbox

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def project() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_sandbox_extra_is_what_tgsandbox_checks_for() -> None:
    extras = project()["project"]["optional-dependencies"]
    # Distribution names equal import names for everything the extra holds today.
    assert names(extras["sandbox"]) == set(tgsandbox.REQUIRES)


def test_the_base_install_leaves_cryptography_to_the_sandbox_extra() -> None:
    base = names(project()["project"]["dependencies"])
    extra = names(project()["project"]["optional-dependencies"]["sandbox"])
    # controller/fernet.py seals secrets with the libcrypto Python links (no package)
    assert "cryptography" not in base
    assert set(tgsandbox.REQUIRES) <= base | extra


def test_the_test_extra_brings_the_sandbox() -> None:
    assert "tgfleet[sandbox]" in project()["project"]["optional-dependencies"]["test"]


def test_tgsandbox_is_packaged_and_type_checked() -> None:
    tool = project()["tool"]
    assert "tgsandbox*" in tool["setuptools"]["packages"]["find"]["include"]
    assert "tgsandbox" in tool["mypy"]["packages"]


def test_python_m_tgsandbox_without_the_extra_says_what_to_install() -> None:
    run_as_if_missing = (
        "import runpy, sys; sys.modules['cryptography'] = None; "
        "runpy.run_module('tgsandbox', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", run_as_if_missing, "serve"], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr == (
        "python -m tgsandbox: the sandbox needs cryptography, which is not installed: "
        "pip install 'tgfleet[sandbox]'\n"
    )
