"""``python -m tgsandbox serve --listen H:P --admin-listen H:P --data DIR``."""

from .cli import app

app(prog_name="python -m tgsandbox")
