#!/usr/bin/env python3
"""idle_streams.py --port P --n N [--backend-port B] [--rss label=PID ...] [--deadline S]

Opens N TCP connections to 127.0.0.1:P in batches, sends one keep-alive
`GET /1k.html` on each and reads the full response, so every connection is
known to be spliced end to end (through the tunnel to nginx). Then, holding
all of them open and idle, it counts ESTABLISHED sockets towards the backend
port (from /proc/net/tcp) and reads VmRSS/VmHWM of the given PIDs (each summed over
the PID and its descendants).
Prints one JSON object on stdout and closes everything. Bounded by --deadline.
RLIMIT_NOFILE is raised to min(hard, N + 1000) (hard limit cannot be raised
without CAP_SYS_RESOURCE; the result says when it is too low).
"""
import argparse
import asyncio
import json
import os
import resource
import sys
import time


def _status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "PPid"):
                out[k] = int(v.split()[0])
    return out


def rss(pid):
    """VmRSS/VmHWM in MiB of PID plus all its descendants (e.g. sshd's session
    children); "procs" = how many processes were summed."""
    pid = int(pid)
    st = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st[int(d)] = _status(d)
            except (OSError, ValueError, IndexError):
                pass
    if pid not in st:
        return {"error": f"pid {pid} not running"}
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in tree:
            tree.add(p)
            todo += [c for c, s in st.items() if s.get("PPid") == p]
    return {"VmRSS": round(sum(st[p].get("VmRSS", 0) for p in tree) / 1024, 1),
            "VmHWM": round(sum(st[p].get("VmHWM", 0) for p in tree) / 1024, 1),
            "procs": len(tree)}


def established_to(port):
    """ESTABLISHED (state 01) IPv4 sockets whose remote or local port is `port`."""
    n_remote = n_local = 0
    hexport = f"{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] != "01":
                    continue
                if parts[2].endswith(":" + hexport):
                    n_remote += 1
                if parts[1].endswith(":" + hexport):
                    n_local += 1
    except OSError:
        return None
    return {"to_port": n_remote, "from_port": n_local}


REQ = b"GET /1k.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def one(port, timeout, conns, errors):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        conns.append(w)
        w.write(REQ)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await asyncio.wait_for(r.readexactly(length), timeout)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace"))
        return True
    except Exception as e:  # noqa: BLE001 - every failure is just counted
        key = f"{type(e).__name__}: {e}"[:80]
        errors[key] = errors.get(key, 0) + 1
        return False


async def main(a):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.n + 1000
    if hard != resource.RLIM_INFINITY and want > hard:
        want = hard
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    pids = dict(x.split("=", 1) for x in a.rss)
    res = {"requested": a.n, "nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
           "nofile_hard": hard, "rss_before": {k: rss(p) for k, p in pids.items()}}
    t0 = time.monotonic()
    deadline = t0 + a.deadline
    conns, errors, ok = [], {}, 0
    opened = 0
    while opened < a.n and time.monotonic() < deadline:
        k = min(a.batch, a.n - opened)
        left = max(1.0, deadline - time.monotonic())
        results = await asyncio.gather(*(one(a.port, min(a.timeout, left), conns, errors)
                                         for _ in range(k)))
        ok += sum(results)
        opened += k
        if errors and sum(errors.values()) > max(100, a.n // 10):
            break  # clearly broken: stop early instead of hammering
    res["open_seconds"] = round(time.monotonic() - t0, 2)
    res["ok"] = ok
    res["failed"] = sum(errors.values())
    res["not_attempted"] = a.n - opened
    res["errors"] = errors
    await asyncio.sleep(a.settle)  # let the processes settle, then sample
    alive = sum(1 for w in conns if not w.is_closing())
    res["still_open_client_side"] = alive
    if a.backend_port:
        res["backend_established"] = established_to(a.backend_port)
    res["rss_with_streams"] = {k: rss(p) for k, p in pids.items()}
    for w in conns:
        w.close()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--batch", type=int, default=50,
                   help="concurrent connects; keep <= the listener backlog (Twisted default 50)")
    p.add_argument("--timeout", type=float, default=20.0, help="per connection+request")
    p.add_argument("--deadline", type=float, default=180.0, help="for opening all")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--backend-port", type=int, default=0)
    p.add_argument("--rss", action="append", default=[], metavar="LABEL=PID")
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
