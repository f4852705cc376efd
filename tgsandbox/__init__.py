"""The local Telegram: an MTProto 2.0 server that Telethon connects to as to a data centre.

Modules, one role each: ``transport`` (TCP framings), ``crypto`` (AES-IGE, RSA, message
keys), ``handshake`` (auth key creation), ``envelope`` (encrypted message layer),
``store`` (SQLite), ``world`` (accounts, messages, pts), ``faults`` (fault board),
``rpc`` (Telegram methods), ``server`` (TCP connections), ``admin_api`` (HTTP),
``admin_client`` (its client), ``cli`` (``tgfleet sandbox``).

This module itself imports nothing heavy: ``tgfleet`` calls ``requirements_problem``
before it runs the sandbox (``tgfleet up --demo`` in its own, resident process).
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "pip install 'tgfleet[sandbox]'"

# What only the sandbox imports, i.e. what the `sandbox` extra in pyproject.toml
# installs (import names; tests/unit/test_packaging.py keeps the two equal).
REQUIRES = ("cryptography", "typer")


def requirements_problem() -> str | None:
    """Why the sandbox cannot run in this environment (one line), or None when it can."""
    missing = [name for name in REQUIRES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"the sandbox needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}"
