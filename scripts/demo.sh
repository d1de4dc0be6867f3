#!/usr/bin/env bash
# The demo: a service, a connector registered with a fresh one-time token, and a sample web
# app, all on 127.0.0.1, the app reached through the tunnel. `scripts/demo.sh stop` ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=$root/.demo
bin=$root/.venv/bin

stop() {
  for name in access connector service sample-app; do
    pidfile=$demo/$name.pid
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

wait_port() {  # wait_port PORT WHAT LOG
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "demo: $2 did not start; its log ($3):" >&2; tail -n 20 "$3" >&2; exit 1
}

if [ "${1:-}" = stop ]; then stop; echo "demo stopped"; exit 0; fi

scripts/setup.sh
stop
rm -rf "$demo"; mkdir -p "$demo/www"
for port in 8000 8080 8081 8082 8443; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is in use; stop what uses it (or scripts/demo.sh stop) and try again" >&2; exit 1
  fi
done

cat > "$demo/www/index.html" <<'HTML'
<!doctype html><title>gateway demo</title>
<h1>Hello from the private network</h1>
<p>This page is served on <a href="http://127.0.0.1:8000/">http://127.0.0.1:8000/</a> and reached through a
connector's outbound mTLS tunnel. With link translation on, the link you see names the external URL.</p>
HTML
head -c 50000000 /dev/urandom > "$demo/www/50MB.bin"

# The sample app: a static web server standing in for an internal app.
(cd "$demo/www" && exec "$bin/python" -m http.server 8000 --bind 127.0.0.1) > "$demo/sample-app.log" 2>&1 &
echo $! > "$demo/sample-app.pid"

"$bin/gateway" check-config examples/demo.toml
"$bin/twistd" --pidfile= -n gateway --config examples/demo.toml > "$demo/service.log" 2>&1 &
echo $! > "$demo/service.pid"
wait_port 8443 "the service" "$demo/service.log"

"$bin/gateway" token create --config examples/demo.toml --group default --output "$demo/token"
"$bin/gateway" connector register --service 127.0.0.1:8443 --token-file "$demo/token" \
  --state-dir "$demo/connector" --name demo-connector
rm -f "$demo/token"

"$bin/twistd" --pidfile= -n gateway --config examples/demo-connector.toml > "$demo/connector.log" 2>&1 &
echo $! > "$demo/connector.pid"

web=(curl -fsS -H "Host: demo.localhost:8080")   # as a browser asking for http://demo.localhost:8080/
ok=0
for _ in $(seq 100); do
  if "${web[@]}" -m 2 http://127.0.0.1:8080/ 2>/dev/null | grep -q "http://demo.localhost:8080/"; then ok=1; break; fi
  sleep 0.1
done
if [ $ok != 1 ]; then
  echo "demo: the app did not answer through the tunnel; logs:" >&2
  tail -n 20 "$demo/service.log" "$demo/connector.log" >&2
  stop; exit 1
fi
want=$(sha256sum < "$demo/www/50MB.bin")
got=$("${web[@]}" -m 30 http://127.0.0.1:8080/50MB.bin | sha256sum)
[ "$want" = "$got" ] || { echo "demo: 50 MB download through the tunnel came back different" >&2; stop; exit 1; }
got=$(curl -fsS -m 30 http://127.0.0.1:8081/50MB.bin | sha256sum)
[ "$want" = "$got" ] || { echo "demo: 50 MB download through the tcp app came back different" >&2; stop; exit 1; }

# Private Access: a user with a personal token signs in and reaches the private app through
# gateway access (the user's credentials live in .demo/user, not in your home directory).
export XDG_CONFIG_HOME=$demo/user
"$bin/gateway" users token create --config examples/demo.toml --user demo-user --expires 1d \
  --output "$demo/user-token" > /dev/null
"$bin/gateway" login --service 127.0.0.1:8443 --token-file "$demo/user-token"
rm -f "$demo/user-token"
"$bin/gateway" access tcp --service 127.0.0.1:8443 --app demo-private --listen 127.0.0.1:8082 \
  > "$demo/access.log" 2>&1 &
echo $! > "$demo/access.pid"
wait_port 8082 "gateway access" "$demo/access.log"
got=$(curl -fsS -m 30 http://127.0.0.1:8082/50MB.bin | sha256sum)
[ "$want" = "$got" ] || { echo "demo: 50 MB download through gateway access came back different" >&2; stop; exit 1; }

cat <<MSG

gateway demo is running on 127.0.0.1 (the sample app was reached through the tunnel as a web
app, as a tcp app and as a private app through gateway access, and a 50 MB download came back
with the same sha256 each way):

  service     tunnel listener 127.0.0.1:8443                                        log: .demo/service.log
              web app "demo-web"  http://demo.localhost:8080/  (HTTP front door, routed by Host)
              tcp app "demo-tcp"  127.0.0.1:8081               (bytes spliced as they are; anyone may connect)
              private app "demo-private" 127.0.0.1:8000        (Private Access: users assigned to it)
  user        demo-user signed in with a personal token; gateway access tcp on 127.0.0.1:8082
                                                                                    log: .demo/access.log
  connector   2 outbound mTLS tunnels to the service                                log: .demo/connector.log
  sample app  127.0.0.1:8000 (only the connector needs to reach it)

Try:
  open http://demo.localhost:8080/ in a browser    # the web app (its link to 127.0.0.1:8000 is translated)
  curl http://demo.localhost:8080/                 # the same (curl resolves *.localhost to 127.0.0.1)
  curl -o /dev/null http://demo.localhost:8080/50MB.bin   # a bulk transfer through the front door
  curl http://127.0.0.1:8081/                      # the tcp app
  curl http://127.0.0.1:8082/                      # the private app, through demo-user's gateway access
  XDG_CONFIG_HOME=$demo/user .venv/bin/gateway access socks --service 127.0.0.1:8443 --listen 127.0.0.1:1080 &
  curl --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:8000/   # the same through SOCKS5
  .venv/bin/gateway users revoke --config examples/demo.toml --user demo-user   # cut demo-user off (within 30 s)
  .venv/bin/gateway connectors list --config examples/demo.toml
  .venv/bin/gateway plugins
  kill -9 \$(cat .demo/service.pid); .venv/bin/twistd --pidfile= -n gateway --config examples/demo.toml >> .demo/service.log 2>&1 &
                                                   # the connector reconnects by itself
  scripts/demo.sh stop                             # stop everything
MSG
