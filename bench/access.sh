# bench/access.sh -- Private Access paths for bench/run (sourced after lib.sh):
#   access  `gateway access tcp` (the user's client) -> service -> connector -> nginx / iperf3
#   sshLR   `ssh -L` to an `ssh -R` forward on the same sshd: a user's hop in front of a reverse
#           tunnel, the OpenSSH way of doing what `gateway access` does
# Both are compared with the gateway TCP app path (`gateway`) and `direct` in the same run.

start_access() {  # service with [access] and private apps, a connector, two `gateway access tcp` clients
  launch_gateway "$T/acc" "[access]
tunnel = \"127.0.0.1:$P_TUN\"

[[apps]]
name = \"bench-web\"
options.allowed_users = [\"bench\"]
segments = [{ destination = \"127.0.0.1\", ports = $P_NGINX, protocol = \"tcp\" }]

[[apps]]
name = \"bench-iperf\"
options.allowed_users = [\"bench\"]
segments = [{ destination = \"127.0.0.1\", ports = $P_IPERF, protocol = \"tcp\" }]
" || return 1
  PATH_LOGS+=("$G/access-web.log" "$G/access-iperf.log")
  echo "\$ gateway users token create" >>"$G/cli.log"
  gw_cli "users token create" users token create --config "$G/svc.toml" --user bench --expires 1d \
    --output "$G/user-token" || return 1
  export XDG_CONFIG_HOME=$G/xdg   # the client's credential cache, inside the scratch dir
  echo "\$ gateway login --token-file" >>"$G/cli.log"
  gw_cli "login" login --service "127.0.0.1:$P_TUN" --token-file "$G/user-token" || return 1
  bg bash -c 'cd "$1" && exec "$2/bin/gateway" access tcp --service "127.0.0.1:$3" --app bench-web --listen "127.0.0.1:$4"' \
    _ "$G" "$VENV" "$P_TUN" "$P_ACC" >"$G/access-web.log" 2>&1
  CPU_LABELS+=" client=$LAST_PID"
  bg bash -c 'cd "$1" && exec "$2/bin/gateway" access tcp --service "127.0.0.1:$3" --app bench-iperf --listen "127.0.0.1:$4"' \
    _ "$G" "$VENV" "$P_TUN" "$P_ACC_I" >"$G/access-iperf.log" 2>&1
  wait_port "$P_ACC" 20 "${BENCH_PIDS[-2]}" || { FAIL_MSG="gateway access (web): $FAIL_MSG"; return 1; }
  wait_http "$P_ACC" 30 || { FAIL_MSG="through gateway access: $FAIL_MSG"; return 1; }
  wait_port "$P_ACC_I" 10 "$LAST_PID" || { FAIL_MSG="gateway access (iperf): $FAIL_MSG"; return 1; }
  HTTP_PORT=$P_ACC; IPERF_PORT=$P_ACC_I
}

start_ssh_lr() {  # sshd; `ssh -R` publishes nginx/iperf3 on it; a user's `ssh -L` reaches them
  start_ssh sshRnd || return 1
  local d=$T/ssh
  PATH_LOGS+=("$T/logs/ssh-L.err")
  bg ssh -tt -i "$d/clientkey" -p "$P_SSHD" -c chacha20-poly1305@openssh.com \
    -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ExitOnForwardFailure=yes -o LogLevel=ERROR \
    -L "127.0.0.1:$P_SSHL:127.0.0.1:$P_SSHR" -L "127.0.0.1:$P_SSHL_I:127.0.0.1:$P_SSHR_I" \
    "$(id -un)@127.0.0.1" sleep 86400 </dev/null >/dev/null 2>"$T/logs/ssh-L.err"
  CPU_LABELS+=" sshL=$LAST_PID"
  wait_port "$P_SSHL" 15 "$LAST_PID" || return 1
  wait_port "$P_SSHL_I" 5 "$LAST_PID" || return 1
  HTTP_PORT=$P_SSHL; IPERF_PORT=$P_SSHL_I
  wait_http "$HTTP_PORT" 10
}
