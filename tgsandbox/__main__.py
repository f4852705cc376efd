"""``python -m tgsandbox serve --listen H:P --admin-listen H:P --data DIR``."""

import sys

from . import requirements_problem


def main() -> None:
    problem = requirements_problem()
    if problem is not None:
        sys.exit(f"python -m tgsandbox: {problem}")
    from .cli import app

    app(prog_name="python -m tgsandbox")


if __name__ == "__main__":
    main()
