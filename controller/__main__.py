"""`python -m controller serve --home DIR` (how Circus runs the controller)."""

from __future__ import annotations

import argparse
import sys

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
