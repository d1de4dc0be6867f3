"""bench/ops_cost.py -- what metrics and the session log cost on the HTTP app path (issue 14), in one run.

Four gateways side by side, each a service node and a connector (two ``twistd gateway``
processes) publishing the same nginx (1 worker, a 1 KiB file) through the HTTP front door
(``options.preauth = "passthrough"``):

- ``off``:      no ``[metrics]``, no session log (the baseline);
- ``metrics``:  ``[metrics] enabled = true`` on the node and on the connector;
- ``session``:  the session log on: ``[logging] session_log = true`` on the node and
  ``gateway logs session on --group default`` for the connector (the config push);
- ``both``:     both of them.

All four run at once (idle but for the one measured), and wrk -t1 -cN takes them in turn, round
after round, each round starting one configuration further on, so a slow phase of the machine or a
place in the order falls on every configuration alike. A configuration's ratio is the median over
rounds of its req/s divided by off's in the same round (the pair ran seconds apart); the CPU the
service and connector processes spent per request (from /proc) is printed beside it, a figure the
machine's noise moves far less than req/s. Targets (issue 14): metrics >= 0.95 x off, session
>= 0.85 x off. After the runs the metrics endpoints are scraped and their request count checked
against wrk's, so the numbers are known to come from a gateway that counted.

Only 127.0.0.1; every process is stopped by PID at the end. Needs wrk and nginx
(scripts/setup.sh --with-tests). Measure on a quiet machine: the figures are ratios of
CPU-bound runs, and anything else running moves them.

    .venv/bin/python bench/ops_cost.py [--quick] [--duration 3] [--rounds 20] [--conns 50] [--keep]

Many short rounds, not a few long ones: on this 2-core VM one configuration's req/s moves by
+-20% from one 10 s run to the next (the machine's own drift, and the service and connector
taking turns, see docs/PERFORMANCE.md), and the median of 20 paired ratios moves far less than
that of 5.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "support")]

from gateway_harness import HOST, Gateway, free_port, toml_table, wait_until  # noqa: E402
from gateway_harness import http_request as get  # noqa: E402
from nginx_harness import Nginx  # noqa: E402

CONFIGS = ("off", "metrics", "session", "both")
TARGETS = {"metrics": 0.95, "session": 0.85}
WEB = "bench.apps.example.test"


def session_log_available() -> bool:
    """Whether this tree has the session log switch (``[logging] session_log``, issue 14 part A)."""
    from gateway.config import _Parser

    return "session_log" in _Parser.LOGGING


def start_gateway(gw: Gateway, name: str, nginx: Nginx, metrics: bool, session: bool) -> dict:
    """A service + connector publishing nginx; returns its ports and processes."""
    front = free_port()
    logging = {"level": "warn", **({"session_log": True} if session else {})}
    svc = gw.service(name=f"{name}-svc", start=False, logging=logging)
    svc.add_front_door(front, [{"name": "web", "external_url": f"http://{WEB}:{front}/",
                                "internal_url": f"http://{HOST}:{nginx.port}/",
                                "options": {"preauth": "passthrough"}}])
    node_metrics = conn_metrics = None
    if metrics:
        node_metrics, conn_metrics = free_port(), free_port()
        svc.config_path.write_text(svc.config_path.read_text() + "\n" + toml_table(
            "metrics", {"enabled": True, "listen": f"tcp:{node_metrics}:interface={HOST}"}))
    switched = None
    if session:
        # Before the node starts: it reads the switches at start, then only every config_interval.
        gw.cli("groups", "create", "default", "--config", str(svc.config_path))
        result = gw.cli("logs", "session", "on", "--group", "default", "--config", str(svc.config_path))
        switched = result.returncode == 0 or f"`gateway logs session on` failed: {result.stdout}{result.stderr}"
    svc.start(wait=False)   # at level warn it never logs "listening": wait for the tunnel port instead
    wait_until(lambda: port_open(svc.port), 30, f"{name}: the service's tunnel port")
    conn = gw.connector(svc, name=f"{name}-conn", start=False, log_level="warn")
    if metrics:
        conn.config_path.write_text(conn.config_path.read_text() + "\n" + toml_table(
            "metrics", {"enabled": True, "listen": f"tcp:{conn_metrics}:interface={HOST}"}))
    conn.start(wait=False)   # no "tunnel up" line at level warn: nginx answering through it says it
    wait_until(lambda: get(front, f"{WEB}:{front}", "/1k.bin")[0].status == 200, 30, f"{name}: nginx through the gateway")
    return {"front": front, "node_metrics": node_metrics, "conn_metrics": conn_metrics, "svc": svc, "conn": conn,
            "switched": switched}


def port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def cpu_seconds(*procs) -> float:
    """User + system CPU seconds the processes have used so far (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14 and 15 of proc(5))
    return total / tick


def wrk(port: int, duration: int, conns: int, procs: tuple = ()) -> dict:
    cpu_before = cpu_seconds(*procs) if procs else 0.0
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-H", f"Host: {WEB}:{port}",
                          f"http://{HOST}:{port}/1k.bin"], capture_output=True, text=True,
                         timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+\w+)", out).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    cpu = cpu_seconds(*procs) - cpu_before if procs else 0.0
    return {"rps": rps, "total": total, "cpu_us": cpu / total * 1e6 if total else 0.0, "p99": p99, "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def counted_requests(port: int) -> float:
    """gateway_http_responses_total{app="web",code_class="2xx"} at 127.0.0.1:port."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "gateway_http_responses_total" and s.labels.get("app") == "web"
               and s.labels.get("code_class") == "2xx")


def session_lines(gateway: dict, role: str = "svc") -> int:
    """Lines in the session log files of the node (``svc``) or connector (``conn``): state dir, rotated ones too."""
    return sum(len(p.read_bytes().splitlines()) for p in gateway[role].state_dir.glob("session*.log*"))


def wrk_arguments(doc: str, rounds: int, conns: int, over: str, duration: int = 10) -> argparse.Namespace:
    """The options of a wrk bench (also bench/multinode.py's): --quick, --duration, --rounds, --conns, --keep."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per measurement, 1 round")
    parser.add_argument("--duration", type=int, default=duration, help=f"seconds per wrk run (default {duration})")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"rounds over {over} (default {rounds})")
    parser.add_argument("--conns", type=int, default=conns, help=f"wrk connections (default {conns})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 2, 1
    return args


def missing_tools(script: str, tools: tuple[str, ...] = ("wrk", "nginx")) -> bool:
    """Say which tool `script` needs and lacks; True if one is missing."""
    for tool in tools:
        if not shutil.which(tool):
            print(f"{script} needs {tool} (scripts/setup.sh --with-tests)", file=sys.stderr)
            return True
    return False


def main() -> int:
    args = wrk_arguments(__doc__, rounds=20, conns=50, over="the four configurations", duration=3)
    if missing_tools("bench/ops_cost.py"):
        return 2
    configs = CONFIGS if session_log_available() else ("off", "metrics")
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-ops."))
    gw = Gateway(tmp / "gw")
    nginx = Nginx(tmp / "nginx", shutil.which("nginx"))
    results: dict[str, list[dict]] = {c: [] for c in configs}
    totals: dict[str, int] = {c: 0 for c in configs}
    gateways: dict[str, dict] = {}
    try:
        (nginx.www / "1k.bin").write_bytes(os.urandom(1024))
        for name in configs:
            gateways[name] = start_gateway(gw, name, nginx, metrics=name in ("metrics", "both"),
                                           session=name in ("session", "both"))
        for name in configs:   # warm-up: connections, pools, caches
            wrk(gateways[name]["front"], 2, args.conns)
        for round_ in range(args.rounds):
            start = round_ % len(configs)
            for name in configs[start:] + configs[:start]:
                g = gateways[name]
                r = wrk(g["front"], args.duration, args.conns, (g["svc"].proc, g["conn"].proc))
                results[name].append(r)
                totals[name] += r["total"]
        checks = []
        for name in configs:
            g = gateways[name]
            if g["node_metrics"]:
                checks.append(f"{name}: the node's metrics counted {counted_requests(g['node_metrics']):.0f} 2xx "
                              f"responses (wrk made {totals[name]} plus its warm-ups)")
            if name in ("session", "both"):
                checks.append(f"{name}: the node's session log has {session_lines(g)} lines, the connector's"
                              f" {session_lines(g, 'conn')}")
                if g["switched"] is not True:
                    checks.append(f"{name}: the connector's session log was not switched on: {g['switched']}")
    finally:
        gw.cleanup()
        nginx.stop()
    report(results, configs, args, checks)
    if args.keep:
        print(f"\nscratch directory kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def p99_range(runs: list[dict]) -> str:
    """wrk's p99 of each round ("850.00us", "18.56ms", "1.02s") as one range in ms."""
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    ms = [float(m.group(1)) * scale[m.group(2)]
          for m in (re.fullmatch(r"([\d.]+)(us|ms|s)", r["p99"]) for r in runs) if m]
    return f"{min(ms):.1f}-{max(ms):.1f} ms" if ms else "?"


def report(results: dict[str, list[dict]], configs: tuple[str, ...], args: argparse.Namespace,
           checks: list[str]) -> None:
    median = {name: statistics.median(r["rps"] for r in runs) for name, runs in results.items()}
    # Per round: this configuration's req/s over off's of the same round.
    paired = {name: statistics.median(r["rps"] / o["rps"] for r, o in zip(runs, results["off"]))
              for name, runs in results.items()}
    cpu = {name: statistics.median(r["cpu_us"] for r in runs) for name, runs in results.items()}
    print(f"## Operations cost on the HTTP app path ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"wrk -t1 -c{args.conns}, {args.duration} s x {args.rounds} rounds, 1 KiB file)\n")
    print("| configuration | req/s (median) | range | p99 (range over rounds) | non-2xx | socket errors | ÷ off (paired) "
          "| CPU µs/request (service + connector) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in configs:
        runs = results[name]
        rps = [r["rps"] for r in runs]
        errors = "; ".join(r["socket_errors"] for r in runs if r["socket_errors"]) or "none"
        print(f"| {name} | {median[name]:.0f} | {min(rps):.0f}-{max(rps):.0f} | {p99_range(runs)} "
              f"| {sum(r['non2xx'] for r in runs)} | {errors} | {paired[name]:.3f} | {cpu[name]:.0f} |")
    print()
    for name, target in TARGETS.items():
        if name in median:
            ratio = paired[name]
            print(f"- {name} / off: {ratio:.3f} (target >= {target}: {'PASS' if ratio >= target else 'MISS'}); "
                  f"CPU per request {cpu[name] / cpu['off']:.3f} x off's")
        else:
            print(f"- {name}: not measured (this tree has no [logging] session_log)")
    if "both" in median:
        print(f"- both / off: {paired['both']:.3f} (a reference)")
    for line in checks:
        print(f"- {line}")


if __name__ == "__main__":
    sys.exit(main())
