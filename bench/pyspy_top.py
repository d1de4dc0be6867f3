#!/usr/bin/env python3
"""pyspy_top.py FILE.collapsed -- where a process spent its CPU, from `py-spy record -f raw`.

py-spy's raw output is one line per distinct stack, root first, frames joined by ';' and the
sample count last: ``process 1;run (twisted/...:1);dataReceived (gateway_http/frontdoor.py:160) 42``.
Only busy samples are in it (py-spy leaves idle threads out), so shares are of CPU time.

Prints: samples per thread kind (the reactor thread, whose stacks start at twistd's
``<module>``, against worker threads such as the resolver's thread pool, starting at
``Thread._bootstrap``); then, for the reactor thread only, self time by source area (ours vs
Twisted vs TLS...), the top functions by self time, by innermost frame of our code, and by
inclusive time (a function counted once per stack). With ``--nonblocking`` some stacks come
out torn (no root); they are counted as "partial" and left out of the reactor tables.
"""
import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
OURS = ("gateway_http/", "gateway_tcp/", "/gateway/")


REACTOR = "reactor thread (twistd main)"


def thread_kind(frames):
    root = frames[0] if frames else ""
    if root.startswith("<module> ("):
        return REACTOR
    if root.startswith("Thread._bootstrap "):
        return "worker threads (thread pool: resolver, ...)"
    return "partial (torn stack, --nonblocking)"


def parse(path):
    stacks = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            head, _, n = line.rpartition(" ")
            if not head or not n.isdigit():
                continue
            stacks.append((head.split(";"), int(n)))
    return stacks


def name(frame):
    """func (short/path.py) without the line number, so a function is one row."""
    m = FRAME.match(frame)
    if not m:
        return frame
    return f"{m['func']} ({short(m['file'])})"


def short(path):
    for marker in ("site-packages/", "/lib/python3", "/work/main/", "plugins/http/", "plugins/tcp/"):
        i = path.find(marker)
        if i >= 0:
            path = path[i + len(marker):]
    return path


def area(frame):
    m = FRAME.match(frame)
    f = m["file"] if m else frame
    if "gateway_http/" in f:
        return "gateway_http (front door, rules)"
    if "/gateway/tunnel/" in f:
        return "gateway/tunnel (frames, streams, mux)"
    if "/gateway/" in f or "gateway_tcp/" in f:
        return "gateway (other)"
    if "twisted/internet/_newtls" in f or "twisted/protocols/tls" in f or "OpenSSL/" in f:
        return "TLS (twisted.protocols.tls, pyOpenSSL)"
    if "twisted/logger" in f or "twisted/python/log" in f:
        return "twisted.logger"
    if "twisted/" in f:
        return "twisted (reactor, tcp, defer)"
    if "attr/" in f or "attrs/" in f:
        return "attrs"
    if "/uuid.py" in f or "/random.py" in f:
        return "uuid/random"
    return "other (stdlib, native, interpreter)"


def table(title, counter, total, n):
    print(f"\n## {title}\n")
    print("| share | samples | function |")
    print("|---|---|---|")
    for k, v in counter.most_common(n):
        print(f"| {100 * v / total:5.1f}% | {v} | `{k}` |")


def main():
    stacks = parse(sys.argv[1])
    if not stacks:
        print("no samples")
        return
    kinds = Counter()
    for frames, n in stacks:
        kinds[thread_kind(frames)] += n
    everything = sum(kinds.values())
    print(f"{everything} busy samples in {sys.argv[1]}")
    table("Samples by thread", kinds, everything, 5)
    stacks = [(f, n) for f, n in stacks if thread_kind(f) == REACTOR]
    total = sum(n for _, n in stacks)
    if not total:
        return
    print(f"\nReactor thread only from here on: {total} samples.")
    self_t, incl, areas, ours_self = Counter(), Counter(), Counter(), Counter()
    for frames, n in stacks:
        frames = [f for f in frames if FRAME.match(f)]   # drop "process N" / thread roots
        if not frames:
            continue
        leaf = frames[-1]
        self_t[name(leaf)] += n
        areas[area(leaf)] += n
        # self time charged to the innermost frame of our code (what our code costs, callees included)
        for f in reversed(frames):
            if any(o in f for o in OURS):
                ours_self[name(f)] += n
                break
        for k in {name(f) for f in frames}:
            incl[k] += n
    table("Self time by area (leaf frame)", areas, total, 20)
    table("Top functions, self time", self_t, total, 25)
    table("Our code: innermost frame of ours on the stack (its callees into Twisted/stdlib included)", ours_self, total, 25)
    table("Top functions, inclusive", incl, total, 40)


if __name__ == "__main__":
    main()
