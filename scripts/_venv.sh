# Shared by scripts/up and scripts/test: make .venv and install tgfleet into it,
# skipping pip when nothing it depends on changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.tgfleet-installed${extras:+-$extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing tgfleet${extras:+[$extras]} into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
    echo "$want" > "$stamp"
fi
# The launcher in C (botrunner/launcher.c), beside the checkout's code, as the wheel
# has it: again whenever the source is newer than the binary.
.venv/bin/python -m botrunner.buildlauncher --if-stale
# The dashboard's browser test (tests/integration/test_dashboard.py) runs Debian's
# Chromium (Playwright's own browser downloads cannot work here), and puts Debian's
# nginx in front of the controller as a TLS-terminating reverse proxy.
if [ "$extras" = "test" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/sbin/nginx ]; } \
    && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium and nginx-light for the browser test"
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        chromium nginx-light
fi
