# bench/lib.sh -- helpers sourced by bench/run (adapted from the project's shared recipes).
# Everything listens on 127.0.0.1 only. Every process started here is recorded
# in BENCH_PIDS and killed by PID in bench_cleanup (EXIT trap). No pkill/killall.

BENCH_PIDS=()
CUR_PID=""   # the measurement running now (wrk/iperf3/curl/idle), killed at exit too

log() { echo "[$(date +%T)] $*" >&2; }

# background a command, remember its PID in LAST_PID and BENCH_PIDS
bg() { "$@" & LAST_PID=$!; BENCH_PIDS+=("$LAST_PID"); }

kill_pids() {  # kill -TERM, wait up to 3 s, then -KILL; only the given PIDs
  local p i
  for p in "$@"; do kill "$p" 2>/dev/null; done
  for i in $(seq 30); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  return 0
}

# is something listening on 127.0.0.1:PORT?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait until PORT accepts, at most SECS; fail early if PID (optional) died
wait_port() {
  local port=$1 secs=$2 pid=${3:-} end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do
    port_open "$port" && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      FAIL_MSG="process $pid exited before port $port opened"; return 1
    fi
    sleep 0.1
  done
  FAIL_MSG="port $port did not open within ${secs}s"; return 1
}

# wait until GET /1k.html through PORT (with Host HOST, optional) answers 200, at most SECS
wait_http() {
  local port=$1 secs=$2 end=$((SECONDS + $2)) code= host=()
  [ -n "${3:-}" ] && host=(-H "Host: $3")
  while [ $SECONDS -lt $end ]; do
    code=$(curl -s -o /dev/null --max-time 2 "${host[@]}" -w '%{http_code}' "http://127.0.0.1:$port/1k.html")
    [ "$code" = 200 ] && return 0
    sleep 0.5
  done
  FAIL_MSG="no HTTP 200 through port $port within ${secs}s (last code: ${code:-none})"; return 1
}

# first base port >= $1 where the whole block of $2 ports is free
pick_ports() {
  local base=$1 n=$2 i busy
  while [ "$base" -lt 32000 ]; do
    busy=0
    for ((i = 0; i < n; i++)); do port_open $((base + i)) && { busy=1; break; }; done
    [ $busy = 0 ] && { echo "$base"; return 0; }
    base=$((base + 100))
  done
  return 1
}

tail_logs() {  # print the last lines of each given log file (to stderr)
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    echo "----- last lines of $f -----" >&2
    tail -n "${TAIL_N:-25}" "$f" >&2
  done
}

# ------------------------------------------------------------------------
install_missing() {  # what scripts/packages.txt lists for bench, and asyncssh (the bench extra)
  # One list for the demo, the tests and the benchmarks: setup.sh reads scripts/packages.txt,
  # installs what is missing as root, and names it otherwise.
  if [ "$VENV" = "$ROOT/.venv" ]; then
    "$ROOT/scripts/setup.sh" --with-bench >&2 || log "scripts/setup.sh --with-bench failed (see above)"
    return 0
  fi
  log "VENV=$VENV is not the project's .venv: not installing into it; scripts/packages.txt lists what bench needs"
  "$PY" -c 'import asyncssh' 2>/dev/null || log "asyncssh missing in $VENV (asshR will fail)"
}

make_assets() {  # www files, throwaway ssh keys
  mkdir -p "$T/www" "$T/logs"
  chmod 755 "$T" "$T/www"   # nginx workers run as nobody when started as root
  head -c 768 /dev/urandom | base64 -w 64 | head -c 1024 > "$T/www/1k.html"
  head -c $((256 * 1024 * 1024)) /dev/urandom > "$T/www/256m.bin"
  make_ssh_keys
}
make_ssh_keys() {  # sshd host key, client key, authorized_keys under $T/ssh
  mkdir -p "$T/ssh"
  ssh-keygen -q -t ed25519 -N '' -f "$T/ssh/hostkey"
  ssh-keygen -q -t ed25519 -N '' -f "$T/ssh/clientkey"
  cp "$T/ssh/clientkey.pub" "$T/ssh/authorized_keys"; chmod 600 "$T/ssh/authorized_keys"
}

# --- backends (shared by every path) -------------------------------------
start_nginx() {  # 1 worker; long keep-alive and many connections for --idle
  cat > "$T/nginx.conf" <<NG
worker_processes 1;
worker_rlimit_nofile $NGINX_NOFILE;
daemon off; master_process on; pid $T/nginx.pid;
error_log $T/logs/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off; sendfile on; tcp_nopush on;
  keepalive_requests 1000000; keepalive_timeout 300s;
  types { text/html html; application/octet-stream bin; }
  server { listen 127.0.0.1:$P_NGINX backlog=4096; root $T/www; }
}
NG
  bg nginx -c "$T/nginx.conf" -e "$T/logs/nginx.err" >/dev/null 2>>"$T/logs/nginx.err"
  NGINX_PID=$LAST_PID
  wait_port "$P_NGINX" 10 "$NGINX_PID"
}
start_iperf() {
  bg iperf3 -s -B 127.0.0.1 -p "$P_IPERF" >"$T/logs/iperf3.log" 2>&1
  IPERF_PID=$LAST_PID
  wait_port "$P_IPERF" 10 "$IPERF_PID"
}

# --- paths ----------------------------------------------------------------
# start_path NAME sets HTTP_PORT, IPERF_PORT, CPU_LABELS ("label=pid ..."),
# PATH_LOGS (files to show on failure). On failure returns 1 with FAIL_MSG.
# stop_path kills the PIDs started since start_path.
start_path() {
  PATH_MARK=${#BENCH_PIDS[@]}; CPU_LABELS=""; PATH_LOGS=(); FAIL_MSG=""; HTTP_HOST=""
  case $1 in
    direct) HTTP_PORT=$P_NGINX; IPERF_PORT=$P_IPERF ;;
    sshR | sshRnd | sshRaes) start_ssh "$1" ;;
    asshR) start_assh ;;
    gateway) start_gateway ;;
    access) start_access ;;   # bench/access.sh
    sshLR) start_ssh_lr ;;
    http*) start_http_path "$1" ;;   # bench/http.sh
    *) FAIL_MSG="unknown path '$1' (known: $ALL_PATHS)"; return 1 ;;
  esac
}
stop_path() {
  local pids=("${BENCH_PIDS[@]:$PATH_MARK}")
  [ ${#pids[@]} -gt 0 ] && kill_pids "${pids[@]}"
  BENCH_PIDS=("${BENCH_PIDS[@]:0:$PATH_MARK}")
  sleep 1   # let ports be released
}
path_alive() {  # all PIDs of the current path still running?
  local p
  for p in "${BENCH_PIDS[@]:$PATH_MARK}"; do kill -0 "$p" 2>/dev/null || return 1; done
}

# sshR and sshRnd use OpenSSH's default cipher (chacha20-poly1305 here), as the recipes' and
# the targets' `ssh -R`; sshRaes is sshRnd with AES-GCM, the cipher our tunnel negotiates.
SSH_AES_CIPHER=aes128-gcm@openssh.com
SSH_CIPHER=$SSH_AES_CIPHER   # what sshd accepts: both, so the client picks
start_ssh() {  # OpenSSH sshd relay + `ssh -R` connector publishing nginx and iperf3
  start_sshd "$1" || return 1
  ssh_reverse "$1" "127.0.0.1:$P_SSHR:127.0.0.1:$P_NGINX" "127.0.0.1:$P_SSHR_I:127.0.0.1:$P_IPERF"
  wait_port "$P_SSHR" 15 "$LAST_PID" || return 1
  wait_port "$P_SSHR_I" 5 "$LAST_PID" || return 1
  HTTP_PORT=$P_SSHR; IPERF_PORT=$P_SSHR_I
  wait_http "$HTTP_PORT" 10
}

start_sshd() {  # NAME: the private sshd on 127.0.0.1:$P_SSHD (keys from make_ssh_keys)
  local d=$T/ssh
  mkdir -p /run/sshd 2>/dev/null
  cat > "$d/sshd_config" <<SC
ListenAddress 127.0.0.1
Port $P_SSHD
HostKey $d/hostkey
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
Ciphers chacha20-poly1305@openssh.com,$SSH_AES_CIPHER
SC
  PATH_LOGS=("$T/logs/sshd-$1.err" "$T/logs/ssh-$1.err")
  bg /usr/sbin/sshd -D -e -f "$d/sshd_config" >/dev/null 2>"$T/logs/sshd-$1.err"
  CPU_LABELS="sshd=$LAST_PID"
  wait_port "$P_SSHD" 10 "$LAST_PID"
}

# NAME FORWARD...: the `ssh -R` connector of path NAME to start_sshd's sshd, one -R per FORWARD
# ("127.0.0.1:PORT:127.0.0.1:DEST"); LAST_PID is ssh's. The caller waits for the forwards.
ssh_reverse() {
  local d=$T/ssh name=$1 f forwards=()
  shift
  for f in "$@"; do forwards+=(-R "$f"); done
  # sshR: -N (no session): Nagle stays on. sshRnd: interactive session (-tt +
  # remote sleep): OpenSSH then sets TCP_NODELAY on the connection.
  local mode=(-N -T) cmd=()
  [ "$name" != sshR ] && { mode=(-tt); cmd=(sleep 86400); }
  local cipher=(-c chacha20-poly1305@openssh.com)
  [ "$name" = sshRaes ] && cipher=(-c "$SSH_AES_CIPHER")
  bg ssh "${mode[@]}" -i "$d/clientkey" -p "$P_SSHD" "${cipher[@]}" \
    -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ExitOnForwardFailure=yes -o LogLevel=ERROR \
    "${forwards[@]}" "$(id -un)@127.0.0.1" "${cmd[@]}" </dev/null >/dev/null 2>"$T/logs/ssh-$name.err"
  CPU_LABELS+=" ssh=$LAST_PID"
}

start_assh() {  # asyncssh relay + connector (pure Python)
  PATH_LOGS=("$T/logs/assh-server.err" "$T/logs/assh-client.err")
  bg "$PY" "$HERE/asyncssh_rtunnel.py" server "$T/ssh" "$P_ASSH" 2>"$T/logs/assh-server.err"
  CPU_LABELS="assh_srv=$LAST_PID"
  wait_port "$P_ASSH" 15 "$LAST_PID" || return 1
  bg "$PY" "$HERE/asyncssh_rtunnel.py" client "$T/ssh" "$P_ASSH" \
    "$P_ASSHR:$P_NGINX" "$P_ASSHR_I:$P_IPERF" 2>"$T/logs/assh-client.err"
  CPU_LABELS+=" assh_cli=$LAST_PID"
  wait_port "$P_ASSHR" 15 "$LAST_PID" || return 1
  wait_port "$P_ASSHR_I" 5 "$LAST_PID" || return 1
  HTTP_PORT=$P_ASSHR; IPERF_PORT=$P_ASSHR_I
  wait_http "$HTTP_PORT" 10
}

# run a gateway CLI command with a deadline; on failure set FAIL_MSG
gw_cli() {
  local what=$1; shift
  if ! (cd "$G" && timeout 30 "$VENV/bin/gateway" "$@") >>"$G/cli.log" 2>&1; then
    FAIL_MSG="'gateway $what' failed (see cli.log)"; return 1
  fi
}

# Our service (the TOML of $2 after its [service] table: apps, [http]) and one registered
# connector, as two twistd processes under $1; both log at warn. Sets G, SVC_PID, CONN_PID.
launch_gateway() {  # dir config-text
  G=$1; mkdir -p "$G"
  PATH_LOGS=("$G/cli.log" "$G/svc.log" "$G/conn.log")
  : >"$G/cli.log"
  printf '[service]\nstate_dir = "%s"\nlisten = "tcp:%s:interface=127.0.0.1"\n\n%s\n[logging]\nlevel = "warn"\n' \
    "$G/svc" "$P_TUN" "$2" > "$G/svc.toml"
  printf '[connector]\nstate_dir = "%s"\n\n[logging]\nlevel = "warn"\n' "$G/conn" > "$G/conn.toml"
  [ -x "$VENV/bin/twistd" ] || { FAIL_MSG="$VENV/bin/twistd not found"; return 1; }
  [ -x "$VENV/bin/gateway" ] || { FAIL_MSG="$VENV/bin/gateway not found"; return 1; }

  bg bash -c 'cd "$1" && exec "$2/bin/twistd" -n --pidfile= gateway --config "$1/svc.toml"' \
    _ "$G" "$VENV" >"$G/svc.log" 2>&1
  SVC_PID=$LAST_PID; CPU_LABELS="service=$SVC_PID"
  wait_port "$P_TUN" 20 "$SVC_PID" || { FAIL_MSG="service: $FAIL_MSG"; return 1; }

  echo "\$ gateway token create" >>"$G/cli.log"
  gw_cli "token create" token create --config "$G/svc.toml" --group default --output "$G/token" || return 1
  [ -s "$G/token" ] || { FAIL_MSG="'gateway token create' wrote no token to $G/token"; return 1; }
  local mode; mode=$(stat -c %a "$G/token")
  [ "$mode" = 600 ] || log "note: token file mode is $mode, expected 600"
  echo "\$ gateway connector register" >>"$G/cli.log"
  gw_cli "connector register" connector register --service "127.0.0.1:$P_TUN" \
    --token-file "$G/token" --state-dir "$G/conn" || return 1

  bg bash -c 'cd "$1" && exec "$2/bin/twistd" -n --pidfile= gateway --config "$1/conn.toml"' \
    _ "$G" "$VENV" >"$G/conn.log" 2>&1
  CONN_PID=$LAST_PID; CPU_LABELS+=" connector=$CONN_PID"
  sleep 0.2
  kill -0 "$CONN_PID" 2>/dev/null || { FAIL_MSG="connector exited at start"; return 1; }
}

start_gateway() {  # our service + connector publishing nginx and iperf3 as TCP apps
  launch_gateway "$T/gw" "[[apps]]
name = \"bench\"
listen = \"tcp:$P_APP:interface=127.0.0.1\"
destination = \"127.0.0.1:$P_NGINX\"
options.preauth = \"none\"

[[apps]]
name = \"bench-iperf\"
listen = \"tcp:$P_APP_I:interface=127.0.0.1\"
destination = \"127.0.0.1:$P_IPERF\"
options.preauth = \"none\"
" || return 1
  wait_port "$P_APP" 20 "$SVC_PID" || { FAIL_MSG="app listen port: $FAIL_MSG"; return 1; }
  wait_http "$P_APP" 20 || { FAIL_MSG="through the tunnel: $FAIL_MSG"; return 1; }
  kill -0 "$CONN_PID" 2>/dev/null || { FAIL_MSG="connector exited"; return 1; }
  wait_port "$P_APP_I" 5 "$SVC_PID" || { FAIL_MSG="iperf app port: $FAIL_MSG"; return 1; }
  HTTP_PORT=$P_APP; IPERF_PORT=$P_APP_I
}

# --- measurements -----------------------------------------------------------
# Each writes raw tool output to $RAW/<path>.<test>.* ; summarize.py parses them.
quiet() { python3 "$HERE/cpumon.py" --wait-quiet "${QUIET_PCT:-30}" "$QUIET_MAX" 2>>"$RAW/quiet.log"; }

# sample CPU of the measurement's process trees while PID $1 runs
cpu_sample() {  # pid label outfile
  local secs; secs=$(awk -v d="$DUR" 'BEGIN{print (d > 2) ? d - 1 : d * 0.6}')
  sleep 0.5
  python3 "$HERE/cpumon.py" "$secs" "$2=$1" $CPU_BACKEND $CPU_LABELS >"$3" 2>/dev/null
}

measure_http() {  # path port conns; HTTP_HOST (set by start_path) is sent as Host when set
  local p=$1 port=$2 c=$3 f=$RAW/$1.http_c$3 url=http://127.0.0.1:$2/1k.html w host=()
  [ -n "$HTTP_HOST" ] && host=(-H "Host: $HTTP_HOST")
  quiet
  timeout 15 wrk -t1 -c"$c" -d"${WARM}s" "${host[@]}" "$url" >/dev/null 2>&1   # warm-up
  timeout $((DUR + 20)) wrk -t1 -c"$c" -d"${DUR}s" --timeout 5s --latency "${host[@]}" "$url" >"$f.wrk" 2>&1 &
  w=$!; CUR_PID=$w
  CPU_BACKEND="nginx=$NGINX_PID" cpu_sample $w wrk "$f.cpu"
  wait $w; echo $? >"$f.rc"
}

measure_iperf() {  # path port up|down
  local f=$RAW/$1.iperf_$3 r=() w
  [ "$3" = down ] && r=(-R)
  quiet
  timeout $((DUR + 20)) iperf3 -c 127.0.0.1 -p "$2" -t "$DUR" "${r[@]}" -J \
    --connect-timeout 5000 >"$f.json" 2>"$f.err" &
  w=$!; CUR_PID=$w
  CPU_BACKEND="iperf_s=$IPERF_PID" cpu_sample $w iperf_c "$f.cpu"
  wait $w; echo $? >"$f.rc"
  if [ "$(cat "$f.rc")" != 0 ]; then  # a killed client can leave the server busy
    kill_pids "$IPERF_PID"; start_iperf || log "iperf3 server restart failed"
  fi
  sleep 0.5
}

measure_curl() {  # path port: download 256 MiB repeatedly for ~DUR s (at least once)
  local f=$RAW/$1.curl w
  quiet
  ( start=${EPOCHREALTIME/[.,]/}; n=0; c=   # microseconds
    trap '[ -n "$c" ] && kill $c 2>/dev/null; exit 143' TERM
    while :; do
      curl -s -o /dev/null --max-time $((DUR + 30)) \
        -w '%{http_code} %{size_download} %{time_total}\n' "http://127.0.0.1:$2/256m.bin" &
      c=$!; wait $c; c=
      n=$((n + 1))
      { [ $(( ${EPOCHREALTIME/[.,]/} - start )) -ge $((DUR * 1000000)) ] || [ $n -ge 100 ]; } && break
    done ) >"$f.txt" 2>&1 &
  w=$!; CUR_PID=$w
  CPU_BACKEND="nginx=$NGINX_PID" cpu_sample $w curl "$f.cpu"
  wait $w
}

measure_idle() {  # N idle spliced streams; RSS of the path's processes (CPU_LABELS)
  local f=$RAW/$1.idle rss=() x
  for x in $CPU_LABELS; do rss+=(--rss "$x"); done
  log "$1: idle streams: opening $IDLE connections through port $2"
  timeout $((IDLE_DEADLINE + 30)) "$PY" "$HERE/idle_streams.py" --port "$2" --n "$IDLE" \
    --backend-port "$P_NGINX" --deadline "$IDLE_DEADLINE" --batch "${IDLE_BATCH:-50}" "${rss[@]}" >"$f.json" 2>"$f.err" &
  CUR_PID=$!
  wait $CUR_PID; echo $? >"$f.rc"
}
