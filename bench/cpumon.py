#!/usr/bin/env python3
# Adapted from the project's shared recipes.
"""cpumon.py SECONDS label=pid [label=pid ...]
   cpumon.py --wait-quiet PCT MAXSECS

Second form: block until the whole machine is quieter than PCT % of one core
over a 1 s sample (foreign jobs share this 2-core box), at most MAXSECS;
prints how long it waited to stderr.  Use it right before a measurement.

Samples utime+stime (from /proc/PID/stat) of each PID *plus all its
descendants* at start and after SECONDS, and prints CPU use as a percentage
of one core for each label, e.g. "cpu: nginx=48% relay=97%".
Also prints machine-wide busy CPU and "other" (busy time outside the listed
trees: foreign jobs on the box, softirq work not charged to a process), a
noise indicator.  Read-only; sends no signals.  Descendants that exit during the window are
missed unless already reaped into the parent's cutime (counted via field 16/17).
"""
import os, sys, time

HZ = os.sysconf("SC_CLK_TCK")

def table():
    t = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        # rest[1]=ppid, rest[11]=utime, rest[12]=stime, rest[13]=cutime, rest[14]=cstime
        t[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    return t

def tree(t, root):
    """root and its descendants that are in table t (a set of pids)."""
    kids = {}
    for pid, (ppid, _) in t.items():
        kids.setdefault(ppid, []).append(pid)
    stack, seen = [root], set()
    while stack:
        p = stack.pop()
        if p in seen or p not in t:
            continue
        seen.add(p)
        stack.extend(kids.get(p, []))
    return seen

def tree_ticks(t, root):
    return sum(t[p][1] for p in tree(t, root))

def busy():
    """Machine-wide non-idle jiffies (all CPUs) from /proc/stat."""
    v = _cpu_line()
    return sum(v) - v[3] - v[4]          # minus idle, iowait


def interrupts():
    """Machine-wide irq + softirq jiffies: the kernel's work not charged to any process (on
    loopback, much of the TCP receive path)."""
    v = _cpu_line()
    return v[5] + v[6]


def _cpu_line():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def wait_quiet(pct, maxsecs):
    t0 = time.monotonic()
    while True:
        b0 = busy(); time.sleep(1.0); b1 = busy()
        now = 100.0 * (b1 - b0) / HZ
        waited = time.monotonic() - t0
        if now < pct or waited >= maxsecs:
            tag = "quiet" if now < pct else "NOT quiet (gave up)"
            print(f"wait-quiet: {tag} after {waited:.0f}s, busy={now:.0f}%", file=sys.stderr)
            return


def main():
    if sys.argv[1] == "--wait-quiet":
        return wait_quiet(float(sys.argv[2]), float(sys.argv[3]))
    secs = float(sys.argv[1])
    pairs = [a.split("=", 1) for a in sys.argv[2:]]
    b0 = busy(); t0 = table(); w0 = time.monotonic()
    a = {l: tree_ticks(t0, int(p)) for l, p in pairs}
    time.sleep(secs)
    t1 = table(); w1 = time.monotonic(); b1 = busy()
    out, mine = [], 0
    for l, p in pairs:
        if int(p) not in t1:              # root exited inside the window
            out.append(f"{l}=exited"); continue
        d = tree_ticks(t1, int(p)) - a[l]
        mine += d
        out.append(f"{l}={100.0 * d / HZ / (w1 - w0):.0f}%")
    # machine = whole box (max = 100% x cores); other = busy time not in the
    # listed trees (other users' jobs, kernel softirq outside process context).
    pct = lambda j: 100.0 * j / HZ / (w1 - w0)
    out.append(f"machine={pct(b1 - b0):.0f}%/{100 * os.cpu_count()}%")
    out.append(f"other={pct(b1 - b0 - mine):.0f}%")
    print("cpu: " + " ".join(out), flush=True)

if __name__ == "__main__":
    main()
