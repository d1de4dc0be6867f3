"""bench/multinode.py -- req/s through 1, 2 and 3 service nodes (issue 15), HTTP app path and TCP path, in one run.

Three ``twistd gateway`` service nodes share a throwaway PostgreSQL cluster (tests/support/
postgres.py) and the first node's CA files; each publishes the same nginx (1 worker, a 1 KiB
file) twice: as a web app through its HTTP front door (``options.preauth = "passthrough"``) and
as a TCP app (a listen app, HTTP carried as bytes). One connector, registered with node 1,
gets the node list in its config and keeps a tunnel to every node (docs/operations.md
"Several nodes"). For n = 1, 2, 3 the same total of wrk connections is spread over the first n
nodes' ports (one ``wrk -t1`` per node, run at once) and their req/s added: what changes is
only how many nodes the load enters through.

On this 2-core machine every process shares two cores, so the figures say what the extra
nodes cost and that nothing stalls, not how a service scales across machines (see
docs/PERFORMANCE.md). Only 127.0.0.1; every process is stopped at the end.

    .venv/bin/python bench/multinode.py [--quick] [--duration 10] [--rounds 3] [--conns 48] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from gateway_harness import HOST, Gateway, free_port, wait_until  # noqa: E402
from gateway_harness import http_request as get  # noqa: E402
from multinode import MultiNode  # noqa: E402
from nginx_harness import Nginx  # noqa: E402
from ops_cost import WEB, missing_tools, port_open, wrk_arguments  # noqa: E402

PATHS = ("http", "tcp")
NODES = (1, 2, 3)


def start_node(cluster: MultiNode, nginx: Nginx) -> dict:
    """A node on the shared store (the shared CA) with a front door and a TCP app to nginx."""
    front, tcp = free_port(), free_port()
    svc = cluster.add_node(start=False, apps=[{"name": "raw", "destination": f"{HOST}:{nginx.port}", "port": tcp}])
    svc.logging["level"] = "warn"
    svc.write_config()
    svc.add_front_door(front, [{"name": "web", "external_url": f"http://{WEB}:{front}/",
                                "internal_url": f"http://{HOST}:{nginx.port}/",
                                "options": {"preauth": "passthrough"}}])
    svc.start(wait=False)   # at level warn it never logs "listening": wait for the tunnel port instead
    wait_until(lambda: port_open(svc.port), 30, f"{svc.name}: the tunnel port")
    return {"svc": svc, "http": front, "tcp": tcp}


def served(node: dict) -> bool:
    """nginx answers through this node's front door and its TCP app (its tunnel is up)."""
    try:
        return (get(node["http"], f"{WEB}:{node['http']}", "/1k.bin")[0].status == 200
                and get(node["tcp"], f"{WEB}:{node['tcp']}", "/1k.bin")[0].status == 200)
    except OSError:
        return False


def spread_wrk(ports: list[int], duration: int, conns: int) -> dict:
    """One wrk per port at once, the connections split evenly; req/s and errors added up."""
    each = max(1, conns // len(ports))
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{each}", f"-d{duration}s", "-H", f"Host: {WEB}:{p}",
                               f"http://{HOST}:{p}/1k.bin"], stdout=subprocess.PIPE, text=True) for p in ports]
    outs = [p.communicate(timeout=duration + 60)[0] for p in procs]
    rps = sum(float(re.search(r"Requests/sec:\s+([\d.]+)", o).group(1)) for o in outs)
    errors = sum(int(m.group(1)) for o in outs for m in [re.search(r"Non-2xx or 3xx responses: (\d+)", o)] if m)
    socket_errors = "; ".join(m.group(1) for o in outs for m in [re.search(r"Socket errors: (.*)", o)] if m)
    return {"rps": rps, "non2xx": errors, "socket_errors": socket_errors}


def main() -> int:
    args = wrk_arguments(__doc__, rounds=3, conns=48, over="the six measurements")
    if missing_tools("bench/multinode.py"):
        return 2
    from postgres import PostgresCluster

    tmp = Path(tempfile.mkdtemp(prefix="gwbench-multinode."))
    gw = Gateway(tmp / "gw")
    nginx = Nginx(tmp / "nginx", shutil.which("nginx"))
    cluster = PostgresCluster.start()
    results: dict[tuple[str, int], list[dict]] = {(p, n): [] for p in PATHS for n in NODES}
    try:
        (nginx.www / "1k.bin").write_bytes(os.urandom(1024))
        several = MultiNode(gw, cluster, cluster.new_database())
        nodes = [start_node(several, nginx) for _ in NODES]
        conn = gw.connector(nodes[0]["svc"], name="conn", start=False, tunnels=1, log_level="warn")
        conn.start(wait=False)
        for node in nodes:
            wait_until(lambda: served(node), 60, f"{node['svc'].name}: nginx through the gateway")
        for path in PATHS:   # warm-up: connections, pools, caches
            spread_wrk([n[path] for n in nodes], 2, args.conns)
        for _ in range(args.rounds):
            for path in PATHS:
                for n in NODES:
                    results[(path, n)].append(spread_wrk([node[path] for node in nodes[:n]], args.duration, args.conns))
    finally:
        gw.cleanup()
        nginx.stop()
        cluster.stop()
    report(results, args)
    if args.keep:
        print(f"\nscratch directory kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict[tuple[str, int], list[dict]], args: argparse.Namespace) -> None:
    print(f"## Several nodes ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, one connector with a tunnel"
          f" to each of 3 nodes, wrk -t1 per node, {args.conns} connections in all, {args.duration} s x"
          f" {args.rounds} rounds, 1 KiB file)\n")
    print("| path | nodes taking load | req/s (median) | range | non-2xx | socket errors | ÷ 1 node |")
    print("|---|---|---|---|---|---|---|")
    for path in PATHS:
        one = statistics.median(r["rps"] for r in results[(path, 1)])
        for n in NODES:
            runs = results[(path, n)]
            rps = [r["rps"] for r in runs]
            median = statistics.median(rps)
            errors = "; ".join(r["socket_errors"] for r in runs if r["socket_errors"]) or "none"
            print(f"| {path} | {n} | {median:.0f} | {min(rps):.0f}-{max(rps):.0f} | {sum(r['non2xx'] for r in runs)}"
                  f" | {errors} | {median / one:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
