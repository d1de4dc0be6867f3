#!/usr/bin/env bash
# bench/ssh_rtunnel.sh -- one of bench/run's OpenSSH `ssh -R` paths (bench/lib.sh start_sshd +
# ssh_reverse), for a benchmark written in another language (bench/smb_copy.py):
#
#   bench/ssh_rtunnel.sh DIR NAME SSHD_PORT LISTEN_PORT:DEST_PORT...
#
# NAME is sshR, sshRnd or sshRaes (bench/README.md). Makes throwaway keys under DIR, starts the
# private sshd on 127.0.0.1:SSHD_PORT and the `ssh -R` connector forwarding each
# 127.0.0.1:LISTEN_PORT to 127.0.0.1:DEST_PORT, waits (with deadlines) until every forward
# listens, then prints one line "ready sshd=PID ssh=PID" and keeps both running until its stdin
# closes or it gets TERM or INT; then stops both by PID. Exit 1 with the logs' tails if a start fails.
set -u -o pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/lib.sh"
[ $# -ge 4 ] || { echo "usage: $0 DIR NAME SSHD_PORT LISTEN_PORT:DEST_PORT..." >&2; exit 2; }
T=$1 NAME=$2 P_SSHD=$3
shift 3
trap '[ ${#BENCH_PIDS[@]} -gt 0 ] && kill_pids "${BENCH_PIDS[@]}"' EXIT
trap 'exit 143' TERM INT

mkdir -p "$T/logs"
make_ssh_keys
FORWARDS=()
for f in "$@"; do FORWARDS+=("127.0.0.1:${f%%:*}:127.0.0.1:${f#*:}"); done
failed() { log "$NAME: $FAIL_MSG"; tail_logs "${PATH_LOGS[@]}"; exit 1; }
start_sshd "$NAME" || failed
ssh_reverse "$NAME" "${FORWARDS[@]}"
for f in "$@"; do wait_port "${f%%:*}" 15 "$LAST_PID" || failed; done
echo "ready $CPU_LABELS"
read -r _ || true
