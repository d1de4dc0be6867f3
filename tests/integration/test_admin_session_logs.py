"""The admin and session logs through real processes: the session log switched on a running
group from the service, rotation's bound on disk, `gateway logs show|follow`, journald's
socket, and connectors' admin events reaching (and bounded by) the service."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from gateway_harness import (
    DATA,
    GATEWAY,
    HOST,
    SYN,
    FrameReader,
    control_message,
    control_messages,
    echo_handler,
    echo_once,
    free_port,
    http_request,
    raw_frame,
    subprocess_env,
    tls_client,
    wait_echo,
    wait_until,
)

FAST = {"config_interval": 1}


def records(path: Path) -> list[dict]:
    """Every JSON line of a log and its rotated files, oldest first."""
    out = []
    for p in sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])) + [path]:
        if p.exists():
            out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def sessions(conn, app: str) -> list[dict]:
    return [r for r in records(conn.state_dir / "session.log") if r.get("app") == app]


@pytest.fixture
def group(gw, backends):
    """A service (config pushed every second) with an echo app and two connectors in its group."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}], service=FAST)
    one, two = gw.connector(svc, tunnels=1), gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))
    return svc, one, two


def echo_until_seen(svc, conns, payload: bytes) -> None:
    """Echo through the app until each of ``conns`` has a session line for it (affinity spreads them)."""
    def seen() -> bool:
        assert echo_once(svc.app_port("echo"), payload) == payload
        return all(sessions(c, "echo") for c in conns)
    wait_until(seen, 30, "session lines on " + ", ".join(c.name for c in conns), interval=0.1)


@pytest.mark.timeout(120)
def test_session_log_switched_on_a_running_group_and_seen_in_the_files(gw, group):
    """Off by default; `gateway logs session on --group` reaches both running connectors through the
    config push (no restart) and they write session lines; `off --connector` stops only that one."""
    svc, one, two = group
    for _ in range(4):
        assert echo_once(svc.app_port("echo"), b"before") == b"before"
    assert not sessions(one, "echo") and not sessions(two, "echo"), "session log on before it was switched on"

    result = gw.cli("logs", "session", "on", "--group", "default", "--config", str(svc.config_path))
    assert result.returncode == 0, result.stderr
    for conn in (one, two):
        wait_until(lambda c=conn: "session log switched on by the service" in c.proc.log(), 30,
                   f"{conn.name} to get the switch")
    echo_until_seen(svc, [one, two], b"x" * 1000)
    line = sessions(one, "echo")[-1]
    assert line["kind"] == "session" and line["role"] == "connector" and line["result"] == "done"
    assert line["bytes_up"] == line["bytes_down"] and line["bytes_up"] > 0 and line["request_id"]
    assert line["connector_id"] == one.connector_id
    assert one.starts == 1 and two.starts == 1, "a connector was restarted"

    result = gw.cli("logs", "session", "off", "--connector", one.connector_id[:10], "--config", str(svc.config_path))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "session log switched off by the service" in one.proc.log(), 30, "the switch off")
    before = len(sessions(one, "echo"))
    marker = len(sessions(two, "echo"))
    wait_until(lambda: echo_once(svc.app_port("echo"), b"y") == b"y" and len(sessions(two, "echo")) > marker + 2,
               30, "more lines on the connector still on", interval=0.1)
    assert len(sessions(one, "echo")) == before, "the connector switched off still writes session lines"

    listing = gw.cli("logs", "session", "list", "--config", str(svc.config_path))
    rows = {tuple(line.split()) for line in listing.stdout.splitlines()}
    assert {("group", "default", "on"), ("connector", one.connector_id, "off")} <= rows, listing.stdout

    shown = gw.cli("logs", "show", "--kind", "session", "--app", "echo", "--result", "done", "--json",
                   "--config", str(two.config_path))
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(x) for x in shown.stdout.splitlines()]
    assert lines and len(lines) == len(sessions(two, "echo")) and all(x["app"] == "echo" for x in lines)


@pytest.mark.timeout(120)
def test_rotation_keeps_the_session_log_within_its_bound(gw, backends):
    """The node's own session log (max_bytes 16 KiB, max_files 3) rotates: never more than 3 files
    nor more than 16 KiB each, the newest record kept, and `gateway logs show` reads across them."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}],
                     logging={"session_log": True, "max_bytes": 16384, "max_files": 3})
    gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))
    path = svc.state_dir / "session.log"
    for i in range(160):
        assert echo_once(svc.app_port("echo"), b"r%d" % i) == b"r%d" % i
    wait_until(lambda: len(records(path)) >= 10 and (svc.state_dir / "session.log.2").exists(), 30,
               "the session log to rotate twice")
    files = sorted(p.name for p in svc.state_dir.glob("session.log*"))
    assert files == ["session.log", "session.log.1", "session.log.2"], files
    sizes = {p.name: p.stat().st_size for p in svc.state_dir.glob("session.log*")}
    assert all(size <= 16384 for size in sizes.values()), sizes
    kept = records(path)
    assert len(kept) < 161, "nothing was dropped: the bound did not hold"
    assert all(r["kind"] == "session" and r["role"] == "service" for r in kept)
    shown = gw.cli("logs", "show", "--kind", "session", "--json", "--config", str(svc.config_path))
    assert [json.loads(x)["request_id"] for x in shown.stdout.splitlines()] == [r["request_id"] for r in kept]


@pytest.mark.timeout(120)
def test_admin_logs_of_node_and_connector_and_events_sent_to_the_service(gw, group):
    """Both admin logs have their key events (JSON lines, in the state dir by default); the
    connector's events reach the service, whose admin log names the connector as their source."""
    svc, one, _ = group
    node_log = svc.state_dir / "admin.log"
    wait_until(lambda: any(r.get("source") == one.connector_id for r in records(node_log)), 30,
               "a connector's admin event in the node's admin log")
    node = records(node_log)
    assert {"node_started", "tunnel_up", "enrolled"} <= {r["event"] for r in node if r["source"] == "node"}
    from_one = [r for r in node if r["source"] == one.connector_id]
    assert {"connector_started", "tunnel_up", "config_applied"} <= {r["event"] for r in from_one}, from_one
    own = records(one.state_dir / "admin.log")
    assert {"connector_started", "tunnel_up", "config_applied"} <= {r["event"] for r in own}
    assert all(r["source"] == one.connector_id for r in own)
    assert (one.state_dir / "admin.log").stat().st_mode & 0o777 == 0o600

    shown = gw.cli("logs", "show", "--kind", "admin", "--result", "info", "--config", str(svc.config_path))
    assert shown.returncode == 0 and "listening for tunnels" in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.timeout(120)
def test_a_connectors_admin_event_is_bounded_and_keeps_its_real_source(gw, group):
    """An admin_event with a forged source, an unknown level, a future time and 200 KB of text is
    kept with the sending connector's id, level info, the node's time and 1000 characters."""
    svc, one, _ = group
    st = one.state_dir
    hello = {"type": "hello", "protocol_version": 1, "software_version": "test", "capabilities": [],
             "connector_id": one.connector_id}
    forged = {"type": "admin_event", "source": "node", "level": "root", "time": 4e9, "event": "forged",
              "text": "A" * 200_000}
    with tls_client(svc.port, st / "client.pem", st / "client.key", st / "ca.pem") as s:
        s.sendall(raw_frame(DATA, SYN, 1, json.dumps({"kind": "control"}).encode())
                  + raw_frame(DATA, 0, 1, control_message(hello)))
        reader, frames = FrameReader(s), []
        while not any(m["type"] == "welcome" for m in control_messages(frames)):
            frame = reader.next()
            assert frame is not None, "the service closed the tunnel before its welcome"
            frames.append(frame)
        s.sendall(raw_frame(DATA, 0, 1, control_message(forged)))
        node_log = svc.state_dir / "admin.log"
        wait_until(lambda: any(r.get("event") == "forged" for r in records(node_log)), 30, "the event logged")
    event = next(r for r in records(node_log) if r.get("event") == "forged")
    assert event["source"] == one.connector_id and event["level"] == "info"
    assert len(event["text"]) == 1000 and event["time"] <= time.time() + 1


@pytest.mark.timeout(120)
def test_logs_follow_prints_new_records_across_a_rotation(gw, backends):
    """`gateway logs follow --kind session` prints each new matching record, also after the file rotates."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}],
                     logging={"session_log": True, "max_bytes": 16384, "max_files": 2})
    gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))
    before = [r["request_id"] for r in records(svc.state_dir / "session.log")]
    follow = subprocess.Popen([GATEWAY, "logs", "follow", "--kind", "session", "--app", "echo", "--json", "--lines", "1",
                               "--config", str(svc.config_path)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(), cwd=gw.tmp)
    try:
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(json.loads(line)["request_id"] for line in follow.stdout),
                                  daemon=True)
        reader.start()
        # It prints the last record there was, then follows: from here every record must come.
        wait_until(lambda: seen == before[-1:], 30, "follow to print the last record")
        for i in range(90):   # ~200 bytes each: past 16 KiB, so the file rotates while followed
            assert echo_once(svc.app_port("echo"), b"f") == b"f"
        wait_until(lambda: (svc.state_dir / "session.log.1").exists(), 30, "a rotation")
        written = [r["request_id"] for r in records(svc.state_dir / "session.log") if r["request_id"] not in before]
        wait_until(lambda: set(written) <= set(seen), 30, "follow to print every record written")
        assert len(seen) == len(set(seen)), "a record was printed twice"
    finally:
        follow.kill()
        follow.wait()


@pytest.mark.timeout(120)
def test_journald_gets_admin_events_in_the_native_protocol(gw, tmp_path):
    """With [logging] journald = true, each admin event is a datagram on the journal socket with
    MESSAGE, PRIORITY and SYSLOG_IDENTIFIER=gateway (the socket here is the test's own)."""
    path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(30)
    try:
        gw.service(logging={"journald": True, "journald_socket": path})
        fields: dict[str, str] = {}
        while fields.get("GATEWAY_EVENT") != "node_started":
            fields = dict(line.split("=", 1) for line in journal.recv(65536).decode().splitlines() if "=" in line)
        assert fields["SYSLOG_IDENTIFIER"] == "gateway" and fields["PRIORITY"] == "6"
        assert "listening for tunnels" in fields["MESSAGE"] and fields["GATEWAY_SOURCE"] == "node"
    finally:
        journal.close()


@pytest.mark.timeout(120)
def test_http_requests_in_the_session_logs_of_node_and_connector(gw, nginx):
    """A request through the front door is one http line on the node (its session_log = true)
    and one on the connector (switched on from the service), same request id, path without
    its query string, the status."""
    port = free_port()
    host = f"wiki.apps.example.test:{port}"
    svc = gw.service(start=False, service=FAST, logging={"session_log": True})
    svc.add_front_door(port, [{"name": "wiki", "external_url": f"http://{host}/",
                               "internal_url": f"http://{HOST}:{nginx.port}/"}])
    svc.start()
    conn = gw.connector(svc)
    assert gw.cli("logs", "session", "on", "--connector", conn.connector_id,
                  "--config", str(svc.config_path)).returncode == 0
    wait_until(lambda: "session log switched on by the service" in conn.proc.log(), 30, "the switch")
    response, _ = http_request(port, host, "/headers?token=s3cr3t-in-query")
    assert response.status == 200

    def http_lines(path: Path) -> list[dict]:
        return [r for r in records(path) if r.get("type") == "http" and r.get("app") == "wiki"]
    wait_until(lambda: http_lines(conn.state_dir / "session.log") and http_lines(svc.state_dir / "session.log"),
               30, "the request's lines on both")
    node, = http_lines(svc.state_dir / "session.log")
    connector, = http_lines(conn.state_dir / "session.log")
    for line, role in ((node, "service"), (connector, "connector")):
        assert (line["role"], line["method"], line["path"], line["status"]) == (role, "GET", "/headers", 200), line
    assert node["request_id"] == connector["request_id"]
    for path in (svc.state_dir / "session.log", conn.state_dir / "session.log"):
        assert "s3cr3t" not in path.read_text(), f"{path} keeps the query string"


@pytest.mark.timeout(120)
def test_the_nodes_session_log_follows_its_config_on_sighup(gw, backends):
    """[logging] session_log = true written to the file and a SIGHUP: the running node starts
    its session log without a restart."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))
    path = svc.state_dir / "session.log"
    assert not records(path), "the node's session log is on by default"
    svc.logging["session_log"] = True
    svc.write_config()
    svc.proc.signal(signal.SIGHUP)
    wait_until(lambda: echo_once(svc.app_port("echo"), b"h") == b"h" and records(path), 30,
               "session lines after the reload", interval=0.2)
    assert svc.starts == 1 and all(r["role"] == "service" and r["app"] == "echo" for r in records(path))


@pytest.mark.timeout(120)
def test_a_stopping_connectors_last_events_are_in_its_admin_log(gw, group):
    """SIGTERM: the drain and the tunnel's end, logged while the connector stops, are still
    written to its admin log (the log closes after the connector has stopped)."""
    _, one, _ = group
    assert one.stop() == 0
    events = [(r["event"], r["level"]) for r in records(one.state_dir / "admin.log")]
    assert ("drain", "info") in events and ("tunnel_lost", "warn") in events, events


@pytest.mark.timeout(60)
def test_session_log_switches_refuse_what_names_nothing(gw):
    """`gateway logs session` refuses an unknown group or connector, a switch without a scope,
    and inherit for a group, each saying what to do; nothing is stored."""
    svc = gw.service(start=False)
    config = ("--config", str(svc.config_path))
    for argv, text in [(("on", "--group", "nosuch"), "no connector group 'nosuch'; known groups: default"),
                       (("on", "--connector", "0123abc"), "no active connector '0123abc'"),
                       (("off",), "needs --group G or --connector C"),
                       (("inherit", "--group", "default"), "inherit is for a connector")]:
        result = gw.cli("logs", "session", *argv, *config)
        assert result.returncode == 1 and text in result.stderr, (argv, result.stdout, result.stderr)
    listing = gw.cli("logs", "session", "list", *config)
    assert "every connector's session log is off" in listing.stdout, listing.stdout
