#!/usr/bin/env bash
# The Quick start from nothing: a clean clone of this checkout's HEAD (committed work only) in a
# temporary directory, so a fresh .venv and tests/node/node_modules, then both Quick start
# commands there: scripts/demo.sh, scripts/demo.sh stop, and CI=true scripts/test.sh (a
# missing component fails it instead of skipping). Each step's exit status and time are reported
# at the end; the directory is removed when every step passed and kept, with its logs, otherwise.
# Usage: scripts/fresh-check.sh [--no-tests]   (--no-tests: clone and demo only)
# The demo uses ports 8000 8080 8081 8443 on 127.0.0.1: stop a running demo first.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
run_tests=1
for a in "$@"; do
  case $a in
    --no-tests) run_tests=0 ;;
    *) echo "usage: scripts/fresh-check.sh [--no-tests]" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/gateway-fresh.XXXXXX")
clone=$work/gateway
results=()
failed=0

step() {  # step NAME COMMAND...: run it in the clone, its output shown and kept in $work/NAME.log
  local name=$1 start=$SECONDS rc
  shift
  echo "fresh-check: $name"
  (cd "$clone" 2>/dev/null || cd "$work"; "$@") 2>&1 | tee "$work/$name.log"
  rc=${PIPESTATUS[0]}
  results+=("$(printf '%-12s exit %-3s %5ss' "$name" "$rc" "$((SECONDS - start))")")
  [ "$rc" = 0 ] || failed=1
  return "$rc"
}

step clone git clone -q --no-local "$repo" "$clone" || { printf '%s\n' "${results[@]}"; exit 1; }
step demo scripts/demo.sh
step demo-stop scripts/demo.sh stop   # also after a failed demo: nothing of it may stay running
if [ $run_tests = 1 ]; then
  step test env CI=true scripts/test.sh
fi

echo "fresh-check: $(git -C "$clone" log -1 --format='%h %s' | cut -c1-70)"
printf '  %s\n' "${results[@]}"
if [ $failed = 0 ]; then
  rm -rf "$work"
  echo "fresh-check: every step passed"
else
  echo "fresh-check: a step failed; the clone and each step's log are kept in $work" >&2
  exit 1
fi
