"""What a fork-mode watcher runs: ``python -S -I launch.py SOCKET NAME CONFIG``.

It runs ``launcher.py`` (beside it) from that file's compiled bytecode in
``__pycache__`` when it is fresh, as an import would. A script given to ``python``
is compiled from source at every start instead, and compiling launcher.py leaves
~1 MB in the heap of every launcher, one per forked bot, for as long as it runs.
A missing or stale cache is compiled from source, as before (and written back
when the directory allows).

Only built-in modules here, as in launcher.py: ``_frozen_importlib_external`` is
the import system's own, loaded in every interpreter.
"""

import _frozen_importlib_external as _bootstrap_external
import sys

NAME = "botrunner_launcher"


def main() -> None:
    source = (__file__.rpartition("/")[0] or ".") + "/launcher.py"
    loader = _bootstrap_external.SourceFileLoader(NAME, source)
    module = type(sys)(NAME)
    module.__file__ = source
    sys.modules[NAME] = module  # as an import would: what looks it up by name finds it
    code = loader.get_code(NAME)
    assert code is not None, source  # a source file always has code
    exec(code, module.__dict__)
    module.main(sys.argv[1:])


if __name__ == "__main__":
    main()
