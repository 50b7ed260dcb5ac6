#!/bin/sh
# autollm-lf in one command.
#   sh autollm.sh          set up .venv if needed, then run the toy example end to end
#   sh autollm.sh test     set up .venv if needed, then run the whole test suite, slow tests included (RUN_SLOW=1;
#                          extra args go to pytest); plain `.venv/bin/python -m pytest` is the fast loop
# The venv is (re)installed only when constraints.txt or pyproject.toml changed since the last install.
set -eu
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
STAMP=.venv/.autollm-installed
WANT=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)

if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "autollm-lf pins packages for Python 3.11"' \
    || { echo "error: Python 3.11 needed (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
  echo "== installing into .venv (pinned by constraints.txt)"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
  echo "$WANT" > "$STAMP"
fi

# System packages the tests drive for real: Debian's chromium + chromium-driver (the WebUI test, headless) and
# postgresql and mariadb-server (the read-only database source tests start their own servers on 127.0.0.1).
need_test_packages() {
  missing=""
  { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || missing="chromium chromium-driver"
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
  command -v mariadb-install-db >/dev/null 2>&1 || missing="$missing mariadb-server"
  [ -n "$missing" ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing $missing (apt-get) for the tests"
    apt-get install -y -q $missing >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; }
  else
    echo "warning: the WebUI, PostgreSQL and MariaDB tests need Debian's packages: sudo apt-get install $missing" >&2
  fi
}

case "${1:-toy}" in
  toy) exec .venv/bin/autollm run examples/toy.yaml ;;
  test) shift; need_test_packages; export RUN_SLOW=1; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: sh autollm.sh [test [pytest args]]" >&2; exit 2 ;;
esac
