#!/usr/bin/env bash
# Set up what gateway needs on a Debian machine: Debian packages (when root and missing),
# a virtualenv in .venv and the project installed into it in editable mode.
# Usage: scripts/setup.sh [--with-tests] [--with-bench]
set -euo pipefail
cd "$(dirname "$0")/.."
want_tests=0; want_bench=0
for a in "$@"; do
  case $a in --with-tests) want_tests=1 ;; --with-bench) want_bench=1 ;; esac
done

# The Debian packages: every line of scripts/packages.txt needed by what was asked for (demo
# always), whose probe finds nothing.
wanted=",demo,"
[ $want_tests = 1 ] && wanted+="tests,"
[ $want_bench = 1 ] && wanted+="bench,"
present() {  # present PROBE: an absolute path, a command name, file:PATH, glob:PATTERN, or py:MODULE[,MODULE...]
  case $1 in
    py:*) python3 -c "import ${1#py:}" 2>/dev/null ;;
    file:*) [ -f "${1#file:}" ] ;;
    glob:*) compgen -G "${1#glob:}" >/dev/null ;;
    /*) [ -x "$1" ] ;;
    *) command -v "$1" >/dev/null ;;
  esac
}
need=()
while read -r component package probe needed_by _; do
  case $component in ''|'#'*) continue ;; esac
  [ -n "$needed_by" ] || { echo "setup: scripts/packages.txt: line '$component' needs 4 columns" >&2; exit 1; }
  for by in ${needed_by//,/ }; do
    if [[ $wanted == *",$by,"* ]]; then present "$probe" || need+=("$package"); break; fi
  done
done < scripts/packages.txt
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${need[*]}"
    # Keep package installs from starting system daemons (nginx, sshd) on this machine; the
    # trap takes our policy away again even when apt-get fails.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      made_policy=1
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    if [ $made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  else
    echo "setup: missing Debian packages: ${need[*]} (run this as root, or: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: gateway needs Python 3.11 or newer; python3 is $(python3 -V)" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=""
# the tests run the kerberos_sso plugin and the PostgreSQL store for real
[ $want_tests = 1 ] && extras="test,kerberos,postgresql"
[ $want_bench = 1 ] && extras="${extras:+$extras,}bench"
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}" > .venv/pip.log 2>&1; then
  tail -n 30 .venv/pip.log >&2; echo "setup: pip install failed (full log: .venv/pip.log)" >&2; exit 1
fi
.venv/bin/python -c 'import gateway, gateway_tcp, gateway_smb, gateway_rdp'
# An editable install does not put twisted/plugins/ on sys.path; twistd finds our plugin
# through this .pth (a regular `pip install .` copies it into Twisted's plugin folder).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/gateway-dev-twisted-plugins.pth"
if [ $want_tests = 1 ]; then
  # oidc-provider and playwright-core, as pinned by tests/node/package-lock.json; Playwright
  # must not fetch browsers of its own.
  export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
  # npm ci empties node_modules before it fills it again: skip it when the modules were
  # installed from this very lock file, so a second setup (bench/run, a test run beside a
  # running one) neither waits for it nor pulls the provider from under a running test.
  stamp=tests/node/node_modules/.gateway-lock.sha256
  lock_sum=$(sha256sum tests/node/package-lock.json 2>/dev/null | cut -d' ' -f1 || true)
  if [ -z "$lock_sum" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$lock_sum" ]; then
    if [ -n "$lock_sum" ]; then npm_cmd=(ci); else npm_cmd=(install); fi
    if ! (cd tests/node && npm "${npm_cmd[@]}" --no-audit --no-fund > ../../.venv/npm.log 2>&1); then
      tail -n 30 .venv/npm.log >&2; echo "setup: npm ${npm_cmd[*]} in tests/node failed" >&2; exit 1
    fi
    [ -n "$lock_sum" ] && echo "$lock_sum" > "$stamp"
  fi
fi
[ $want_bench = 1 ] && command -v npm >/dev/null && { bench/node/install.sh || echo "setup: localtunnel for bench/run did not install (its httpLocaltunnel path will say why)" >&2; }
grep -q ' gateway ' <<< "$(.venv/bin/twistd --help)" || { echo "setup: twistd does not see the gateway plugin" >&2; exit 1; }
