"""What a fresh interpreter imports: the import-budget tests' one probe."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(code: str, modules: list[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``
    (this one has imported everything the other tests use)."""
    probe = (
        f"import sys\n{code}\n"
        "print('loaded:', *(m for m in sys.argv[1:] if sys.modules.get(m)), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *modules], capture_output=True, text=True, check=True
    )
    return done.stderr.splitlines()[-1].split()[1:]
