"""The operations logs without the network: rotation, the admin log's choice of events,
journald's datagrams, the session log switches and the connector's admin event forwarder."""

from __future__ import annotations

import json
import struct

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from gateway.oplogs import journald
from gateway.oplogs.admin import AdminLog
from gateway.oplogs.files import MAX_RECORD, RotatingLog, encode_record, log_files, read_records
from gateway.oplogs.forward import AdminEventForwarder
from gateway.oplogs.session import SessionLog, switched_on, url_path


def test_rotation_keeps_the_files_within_max_bytes_times_max_files(tmp_path):
    """Past max_bytes a log rotates; never more than max_files files, none over max_bytes, newest kept."""
    log = RotatingLog(tmp_path / "s.log", max_bytes=1000, max_files=3)
    for i in range(200):
        log.write({"n": i, "pad": "x" * 50})
    log.close()
    files = log_files(tmp_path / "s.log")
    assert [p.name for p in files] == ["s.log.2", "s.log.1", "s.log"]
    assert all(p.stat().st_size <= 1000 for p in files)
    numbers = [r["n"] for r in read_records(tmp_path / "s.log")]
    assert numbers == sorted(numbers) and numbers[-1] == 199 and len(numbers) < 200


def test_a_log_with_flush_soon_writes_a_turns_lines_at_once_and_loses_none_across_a_rotation(tmp_path):
    """With flush_soon (the session log: callLater(0)), lines wait for the one flush of the turn;
    a rotation meanwhile writes the old file's lines out before renaming it; close writes the rest."""
    clock = Clock()
    path = tmp_path / "s.log"
    log = RotatingLog(path, max_bytes=1000, max_files=3, flush_soon=lambda flush: clock.callLater(0, flush))
    log.write({"n": 0})
    assert path.read_bytes() == b"" and len(clock.getDelayedCalls()) == 1
    log.write({"n": 1})
    assert len(clock.getDelayedCalls()) == 1, "one flush per turn, not per line"
    clock.advance(0)
    assert [r["n"] for r in read_records(path)] == [0, 1]
    for i in range(2, 40):
        log.write({"n": i, "pad": "x" * 50})   # rotates in the middle of the turn
    clock.advance(0)
    for i in range(40, 45):
        log.write({"n": i})
    log.close()
    assert [r["n"] for r in read_records(path)] == list(range(45))
    assert len(log_files(path)) == 3


def test_one_file_only_is_truncated_in_place(tmp_path):
    """max_files = 1: the log starts again instead of keeping an old file."""
    log = RotatingLog(tmp_path / "a.log", max_bytes=200, max_files=1)
    for i in range(20):
        log.write({"n": i, "pad": "y" * 40})
    assert [p.name for p in log_files(tmp_path / "a.log")] == ["a.log"]
    assert (tmp_path / "a.log").stat().st_size <= 200


def test_a_huge_record_is_cut_to_one_bounded_line():
    """A record longer than MAX_RECORD is shortened, marked, and still one JSON line."""
    line = encode_record({"text": "z" * (10 * MAX_RECORD), "n": 1})
    assert len(line) <= MAX_RECORD and line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record["truncated"] is True and record["n"] == 1


def test_log_files_are_private(tmp_path):
    """The log files are created 0600: they name users and addresses."""
    RotatingLog(tmp_path / "p.log", 1000, 2).write({"a": 1})
    assert (tmp_path / "p.log").stat().st_mode & 0o777 == 0o600


def test_admin_log_takes_key_events_and_warnings_only(tmp_path):
    """Info lines go to the admin log only with a key event name; warnings and errors always."""
    publisher = LogPublisher()
    admin = AdminLog("node", RotatingLog(tmp_path / "admin.log", 100_000, 2))
    seen: list[dict] = []
    admin.listeners.append(seen.append)
    publisher.addObserver(admin)
    log = Logger(namespace="t", observer=publisher)
    log.info("chatter {n}", n=1)
    log.info("tunnel {tunnel_id} up", event="tunnel_up", tunnel_id="t1")
    log.warn("disk {what}", what="slow")
    records = list(read_records(tmp_path / "admin.log"))
    assert [(r["level"], r["event"], r["text"]) for r in records] == [
        ("info", "tunnel_up", "tunnel t1 up"), ("warn", "", "disk slow")]
    assert records[0]["tunnel_id"] == "t1" and records[0]["source"] == "node"
    assert seen == records


def test_a_listener_that_logs_does_not_loop(tmp_path):
    """A listener logging a warning from inside the admin log is not fed back into it."""
    publisher = LogPublisher()
    admin = AdminLog("node", RotatingLog(tmp_path / "admin.log", 100_000, 2))
    log = Logger(namespace="t", observer=publisher)
    admin.listeners.append(lambda record: log.warn("again"))
    publisher.addObserver(admin)
    log.warn("once")
    assert [r["text"] for r in read_records(tmp_path / "admin.log")] == ["once"]


def test_journald_datagram_follows_the_native_protocol():
    """Fields are KEY=value lines; a value with a newline is KEY, a little-endian length, the bytes."""
    data = journald.encode({"MESSAGE": "two\nlines", "priority": 4, "gateway-app": "web"})
    assert data == (b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" + b"PRIORITY=4\n"
                    + b"GATEWAY_APP=web\n")
    fields = journald.journal_fields({"time": 1.0, "level": "error", "text": "x", "app": "web"})
    assert fields["PRIORITY"] == 3 and fields["SYSLOG_IDENTIFIER"] == "gateway" and fields["GATEWAY_APP"] == "web"


def test_session_log_writes_only_for_a_role_switched_on(tmp_path):
    """Each role has its own switch; records of a role switched off are not written."""
    log = SessionLog(RotatingLog(tmp_path / "s.log", 100_000, 2), clock=Clock())
    log.write("connector", {"app": "a"})
    assert log.switch("connector", True) and not log.switch("connector", True)
    log.write("connector", {"app": "b"})
    log.write("service", {"app": "c"})
    assert [(r["role"], r["app"]) for r in read_records(tmp_path / "s.log")] == [("connector", "b")]


def test_an_http_line_is_the_record_the_general_path_writes(tmp_path):
    """write_http's hand-made JSON says what write() of the same record says, whatever the values hold."""
    clock = Clock()
    clock.advance(1764800000.1234)
    log = SessionLog(RotatingLog(tmp_path / "s.log", 1_000_000, 2), clock=clock)
    log.switch("service", True)
    hostile = 'a"b\\c\n\x00\u2028é/😀'
    more = {"user": hostile, "client": None, "bytes_down": 1024, "cached": False, "ratio": 0.5,
            "facts": {"nested": [1, "x"]}, hostile: "key"}
    log.write_http("service", "r1", "GET", "/p" + hostile, 404, "web", more)
    log.write("service", {"type": "http", "request_id": "r1", "app": "web", "method": "GET",
                          "path": "/p" + hostile, "status": 404, "result": "404", **more})
    log.write_http("service", "r2", "GET", "/" + "x" * MAX_RECORD, 200, "web", {})   # too long: cut
    log.write_http("connector", "r3", "GET", "/", 200, "web", {})   # a role switched off
    fast, general, cut = list(read_records(tmp_path / "s.log"))
    assert fast == general
    assert fast["time"] == 1764800000.123 and fast["status"] == 404 and fast["user"] == hostile
    assert cut["truncated"] is True and cut["request_id"] == "r2" and len(cut["path"]) < MAX_RECORD


def test_a_connectors_own_switch_wins_over_its_groups():
    """A connector's switch, else its group's, else off."""
    switches = {("group", "g"): True, ("connector", "c2"): False}
    assert switched_on(switches, "c1", "g") is True
    assert switched_on(switches, "c2", "g") is False
    assert switched_on(switches, "c3", "other") is False


def test_the_session_log_never_keeps_a_query_string():
    """Only the path of a request target is logged: a query may carry a secret."""
    assert url_path(b"/a/b?token=secret") == "/a/b"
    assert url_path("http://h/x?y=1") == "/x"


def test_forwarder_bounds_the_rate_and_says_how_many_it_dropped():
    """Past the burst, events are dropped and counted; once the bucket refills one event says how many."""
    clock, sent = Clock(), []
    forwarder = AdminEventForwarder(clock, lambda m: sent.append(m) or True, rate=1.0, burst=3)
    for i in range(10):
        forwarder.report({"time": 0, "level": "warn", "text": f"e{i}"})
    assert [m["text"] for m in sent] == ["e0", "e1", "e2"] and forwarder.dropped == 7
    clock.advance(1)
    forwarder.report({"time": 1, "level": "info", "text": "later"})
    assert "7 admin events" in sent[3]["text"] and sent[4]["text"] == "later"


def test_forwarder_keeps_events_until_a_tunnel_is_up():
    """Events made with no tunnel up wait (bounded, newest kept) and go at the next flush."""
    clock, sent, up = Clock(), [], [False]
    forwarder = AdminEventForwarder(clock, lambda m: up[0] and (sent.append(m) or True), rate=1000, burst=1000)
    for i in range(80):
        forwarder.report({"time": 0, "level": "warn", "text": f"e{i}"})
        clock.advance(1)
    assert sent == [] and len(forwarder.waiting) == 50
    up[0] = True
    forwarder.flush()
    assert [m["text"] for m in sent] == [f"e{i}" for i in range(30, 80)]


def test_the_logs_stop_only_after_every_role_has_stopped(tmp_path):
    """LoggedServices: the admin log still takes what a role logs while it stops (a drain that
    takes a while), and closes after."""
    from twisted.application.service import Service
    from twisted.internet.defer import Deferred

    from gateway.config import LoggingConfig
    from gateway.oplogs.service import LoggedServices, OpLogs

    publisher = LogPublisher()
    log = Logger(namespace="t", observer=publisher)
    config = LoggingConfig(admin_log=tmp_path / "admin.log", session_log_file=tmp_path / "session.log")
    top = LoggedServices(OpLogs(config, Clock(), "node", publisher))
    drained: Deferred = Deferred()

    class Draining(Service):
        def stopService(self):
            super().stopService()
            return drained

    Draining().setServiceParent(top)
    top.startService()
    stopped = top.stopService()
    log.warn("tunnel lost while draining")
    drained.callback(None)
    log.warn("after the stop")
    assert stopped.called
    assert [r["text"] for r in read_records(tmp_path / "admin.log")] == ["tunnel lost while draining"]


def test_the_updater_writes_its_update_steps_to_an_admin_log_beside_the_connectors(tmp_path):
    """The updater's process logs an update step as an admin event, with source updater, in
    updater-admin.log next to the connector's admin log; no session log; off stays off."""
    from attrs import evolve

    from gateway.config import LoggingConfig
    from gateway.oplogs.service import OpLogs
    from gateway.updater.tap import updater_logging

    connector_logging = LoggingConfig(admin_log=tmp_path / "admin.log", session_log=True,
                                      session_log_file=tmp_path / "session.log")
    logging = updater_logging(connector_logging)
    assert logging.admin_log == tmp_path / "updater-admin.log" and logging.session_log is False
    assert updater_logging(evolve(connector_logging, admin_log=None)).admin_log is None
    publisher = LogPublisher()
    oplogs = OpLogs(logging, Clock(), "updater", publisher)
    oplogs.startService()
    log = Logger(observer=publisher, namespace="gateway.updater.daemon")
    log.info("{text}", text="updated from 1.0 to 1.1", event="update")
    log.info("a poll found nothing new")
    oplogs.stopService()
    records = list(read_records(tmp_path / "updater-admin.log"))
    assert [(r["source"], r["event"], r["text"]) for r in records] == [("updater", "update", "updated from 1.0 to 1.1")]
    assert not (tmp_path / "admin.log").exists()
