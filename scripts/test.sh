#!/usr/bin/env bash
# The whole test suite: unit tests (no real reactor) and integration tests (real processes
# talking over 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-tests
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
