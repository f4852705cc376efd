"""`python -m controller serve --home DIR` (how Circus runs the controller)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def ca_bundle_left_out() -> Iterator[None]:
    """While importing the controller: aiohttp's import builds its two default client
    TLS contexts, each loading the system's CA bundle, and keeps them (1.8 MB resident
    for good). The controller's one TLS client, the webhook, makes its own context when
    it first posts (``controller.app.webhook_poster``); the defaults get no bundle file
    (certificates in ``SSL_CERT_DIR``, looked up one by one, still verify)."""
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = os.devnull
    try:
        yield
    finally:
        if before is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = before


with ca_bundle_left_out():
    from controller.app import main


def run() -> int:
    parser = argparse.ArgumentParser(prog="python -m controller")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the controller (as the Circus watcher 'controller')")
    serve.add_argument("--home", default=None)
    args = parser.parse_args()
    return main(args.home)


if __name__ == "__main__":
    sys.exit(run())
