#!/usr/bin/env python3
"""An SMB copy of 1 GiB (smbclient get and put): direct, through `ssh -R` (nodelay) and through our path.

    .venv/bin/python bench/smb_copy.py [--quick] [--reps 3] [--mib 1024] [--paths direct,sshRnd,gateway,access]

Issue 11's bench item, in one run on 127.0.0.1 only: a private smbd (the test harness's
``Samba``, tests/integration/smb_rdp_harness.py) and these paths to it:

- ``direct``: smbclient → smbd;
- ``sshRnd``: bench/run's `ssh -tt -R … sleep` (OpenSSH sets TCP_NODELAY; default cipher) to a
  private sshd, started by bench/ssh_rtunnel.sh from bench/lib.sh;
- ``gateway``: our service + connector (two twistd processes, the test harness's), a listen app
  with ``protocol = "smb"`` and ``options.preauth = "none"``;
- ``access``: ``gateway access tcp`` (a signed-in user's client) → the same service → connector,
  to a private app with ``protocol = "smb"`` (a reference: one more hop and TLS session).

Per repetition (--reps, default 3; --quick 1) and path, in turn: a put of the file, then a get
of it back, each timed from smbclient's start to its exit and checked by sha256 (the share's copy
after the put, the local copy after the get). Reported: Gbit/s median (and range), the CPU of
each process tree during the copies (utime+stime from /proc, as bench/cpumon.py), the foreign
load, and gateway ÷ sshRnd with PASS/MISS against the target (≥ 1.0). Markdown on stdout and in
bench/results/<date>-<time>-smb-copy.md; logs in the matching .raw/ directory. Every wait has a
deadline (--copy-timeout per copy, --max-minutes for the whole run: repetitions still to do
past it are skipped and said so); every process started here is stopped by its own id.
"""

from __future__ import annotations

import argparse
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "support")]

import cpumon  # noqa: E402
from gateway_harness import GATEWAY, HOST, Gateway, free_port, wait_until  # noqa: E402
from smb_rdp_harness import Samba  # noqa: E402
from smb_transfer import MIB, CopyFailed, copy, gbit_per_s, make_file, sha256_of  # noqa: E402
from test_access_private import _accepts, publish, sign_in_with_token  # noqa: E402

ALL_PATHS = ("direct", "sshRnd", "gateway", "access")
TARGET = ("gateway", "sshRnd", 1.0)   # ours ÷ ssh -R nodelay ≥ 1.0 (issue 11)
NOISY_OTHER = 30.0   # % of a core of foreign load above which a copy is marked noisy, as bench/run
START_DEADLINE = 60.0
SETTLE_DEADLINE = 5.0


@dataclass
class Route:
    """One way to reach smbd: the port smbclient connects to and the processes that carry it."""

    name: str
    port: int
    pids: dict[str, int]   # label: root of a process tree whose CPU is reported


@dataclass
class Copy:
    """One timed smbclient put or get whose copy had the right sha256."""

    path: str
    direction: str
    seconds: float
    cpu: dict[str, float]   # % of one core per process tree over the copy
    softirq: float          # % of one core: the kernel's irq + softirq work (loopback TCP)
    other: float            # % of one core of foreign load


@dataclass
class Run:
    """What one run measured, the paths that failed (and why), and what it left out."""

    copies: list[Copy] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- paths ----------------------------------------------------------------------------------


class SshTunnel:
    """bench/ssh_rtunnel.sh: sshd + `ssh -R` from bench/lib.sh, alive while its stdin is open."""

    def __init__(self, work: Path, name: str, dest_port: int) -> None:
        self.port = free_port()
        self.log_path = work / f"{name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["bash", str(HERE / "ssh_rtunnel.sh"), str(work / name), name, str(free_port()),
                 f"{self.port}:{dest_port}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], START_DEADLINE)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"{name} did not start within {START_DEADLINE:.0f}s: "
                               f"{self.log_path.read_text()[-2000:]}")
        self.pids = {label: int(pid) for label, pid in (x.split("=") for x in line.split()[1:])}

    def stop(self) -> None:
        """Close its stdin (it stops sshd and ssh by PID), then TERM and KILL past deadlines."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)


def start_gateway(gw: Gateway, samba: Samba, work: Path, with_access: bool) -> list[Route]:
    """One service with a listen smb app (and, with_access, a private smb app for a signed-in
    user), one connector with the default two tunnels; the paths through them."""
    svc = gw.service([{"name": "files", "destination": f"{HOST}:{samba.port}", "protocol": "smb"}], start=False)
    if with_access:
        publish(svc, {"name": "files-private", "protocol": "smb", "options": {"allowed_users": ["bench"]},
                      "segments": [{"destination": HOST, "ports": str(samba.port)}]})
    svc.start()
    conn = gw.connector(svc, tunnels=2)
    gateway_pids = {"service": svc.proc.pid, "connector": conn.proc.pid}
    paths = [Route("gateway", svc.app_port("files"), gateway_pids)]
    if with_access:
        env = sign_in_with_token(gw, svc, work / "home", user="bench")
        port = free_port()
        client = gw.spawn("access", [GATEWAY, "access", "tcp", "--service", svc.address, "--app", "files-private",
                                     "--listen", f"{HOST}:{port}"], env=env)
        wait_until(lambda: _accepts(port), START_DEADLINE, "gateway access tcp to listen")
        paths.append(Route("access", port, {"client": client.pid, **gateway_pids}))
    return paths


def check_reachable(samba: Samba, path: Route) -> None:
    """smbclient ls through the path succeeds (within the start deadline)."""
    def listed() -> bool:
        return samba.client(path.port, timeout=30).returncode == 0
    wait_until(listed, START_DEADLINE, f"smbclient ls through {path.name}", interval=1.0)


# -- measuring ------------------------------------------------------------------------------


def smbd_settled(samba: Samba, before: set[int]) -> dict:
    """The process table once smbd's process for the copy's connection has gone (and been
    reaped, so its CPU time is in smbd's cutime), or after SETTLE_DEADLINE."""
    def settled() -> dict | None:
        table = cpumon.table()
        return table if cpumon.tree(table, samba.proc.pid) <= before else None
    try:
        return wait_until(settled, SETTLE_DEADLINE, "smbd's connection process to exit")
    except AssertionError:
        return cpumon.table()


def measured_copy(samba: Samba, path: Route, direction: str, local: Path, remote: str, timeout: float) -> Copy:
    """One copy with the CPU of every process tree of the path, smbd's and smbclient's (as % of
    one core over the copy's time)."""
    trees = {"smbd": samba.proc.pid, **path.pids}
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, irq0, table0 = cpumon.busy(), cpumon.interrupts(), cpumon.table()
    seconds = copy(samba, path.port, direction, local, remote, timeout)
    busy1, irq1 = cpumon.busy(), cpumon.interrupts()
    table1 = smbd_settled(samba, cpumon.tree(table0, samba.proc.pid))
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # smbclient has exited and been reaped by now: its time is in our children's rusage
    client = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    ticks = {label: cpumon.tree_ticks(table1, pid) - cpumon.tree_ticks(table0, pid) for label, pid in trees.items()}
    cpu = {"smbclient": 100 * client / seconds, **{label: 100 * t / cpumon.HZ / seconds for label, t in ticks.items()}}
    softirq = 100 * (irq1 - irq0) / cpumon.HZ / seconds
    other = 100 * (busy1 - busy0) / cpumon.HZ / seconds - sum(cpu.values()) - softirq
    return Copy(path.name, direction, seconds, cpu, softirq, max(other, 0.0))


def measure(samba: Samba, routes: list[Route], work: Path, args: argparse.Namespace, run: Run) -> None:
    source = work / "source.bin"
    print(f"writing {args.mib} MiB of random bytes", file=sys.stderr)
    digest = make_file(source, args.mib)
    deadline = time.monotonic() + args.max_minutes * 60
    for rep in range(args.reps):
        for path in routes:
            if path.name in run.failures:
                continue
            if time.monotonic() > deadline:
                run.notes.append(f"--max-minutes {args.max_minutes} reached: repetition {rep + 1} of "
                                 f"{args.reps} onwards skipped")
                return
            remote, back = f"bench-{path.name}.bin", work / f"back-{path.name}.bin"
            try:
                for direction, local, copied in (("put", source, samba.share / remote), ("get", back, back)):
                    cpumon.wait_quiet(args.quiet_pct, args.quiet_max)
                    print(f"[{time.strftime('%T')}] {path.name}: {direction} {rep + 1}/{args.reps}", file=sys.stderr)
                    done = measured_copy(samba, path, direction, local, remote, args.copy_timeout)
                    if sha256_of(copied) != digest:
                        raise CopyFailed(f"{direction} through {path.name}: sha256 of the copy differs")
                    run.copies.append(done)
            except CopyFailed as e:
                run.failures[path.name] = str(e)
            finally:
                back.unlink(missing_ok=True)
                (samba.share / remote).unlink(missing_ok=True)


# -- report ---------------------------------------------------------------------------------


def rates(run: Run, path: str, direction: str, nbytes: int) -> list[float]:
    return [gbit_per_s(nbytes, c.seconds) for c in run.copies if c.path == path and c.direction == direction]


def cpu_summary(run: Run, path: str, direction: str) -> str:
    copies = [c for c in run.copies if c.path == path and c.direction == direction]
    if not copies:
        return ""
    labels = copies[0].cpu.keys()
    return ", ".join(f"{label} {statistics.mean(c.cpu[label] for c in copies):.0f}" for label in labels)


def report(run: Run, paths: list[str], args: argparse.Namespace, meta: list[str]) -> str:
    nbytes = args.mib * MIB
    lines = [f"# SMB copy of {args.mib} MiB: direct, ssh -R (nodelay), gateway", "",
             *(f"- {m}" for m in meta), "",
             f"smbclient put then get, {args.reps} repetition(s) per path, each copy checked by sha256. "
             "Gbit/s: median (min-max). CPU: % of one core per process tree, mean over the copies; "
             "softirq: the kernel's irq + softirq time (loopback TCP, charged to no process); "
             f"other: the rest, foreign load (median; ⚠ above {NOISY_OTHER:.0f} %: noisy, rerun on a quiet machine).",
             "", "| path | direction | Gbit/s | CPU (% of a core) | softirq | other |", "|---|---|---|---|---|---|"]
    for path in paths:
        if path in run.failures:
            lines.append(f"| {path} | | FAILED: {run.failures[path].splitlines()[0][:200]} | | | |")
        for direction in ("put", "get"):
            got = rates(run, path, direction, nbytes)
            if not got:
                continue
            copies = [c for c in run.copies if c.path == path and c.direction == direction]
            other = statistics.median(c.other for c in copies)
            mark = " ⚠" if other > NOISY_OTHER else ""
            lines.append(f"| {path} | {direction} | **{statistics.median(got):.2f}** ({min(got):.2f}-{max(got):.2f})"
                         f" | {cpu_summary(run, path, direction)} | {statistics.mean(c.softirq for c in copies):.0f}"
                         f" | {other:.0f}{mark} |")
    lines += ["", "| ratio (medians) | put | get | target |", "|---|---|---|---|"]
    ours, reference, target = TARGET
    for num, den in ((ours, reference), ("access", reference), (ours, "direct"), (reference, "direct")):
        ratios = []
        for direction in ("put", "get"):
            a, b = rates(run, num, direction, nbytes), rates(run, den, direction, nbytes)
            ratios.append(statistics.median(a) / statistics.median(b) if a and b else None)
        cells = [f"{r:.3f}" if r is not None else "n/a" for r in ratios]
        if (num, den) == (ours, reference):
            verdicts = ["PASS" if r is not None and r >= target else "MISS" for r in ratios]
            goal = f"≥ {target:.1f}: put {verdicts[0]}, get {verdicts[1]}"
        else:
            goal = "(reference)"
        if cells != ["n/a", "n/a"] or (num, den) == (ours, reference):
            lines.append(f"| {num} ÷ {den} | {cells[0]} | {cells[1]} | {goal} |")
    if run.notes:
        lines += ["", *(f"Note: {n}" for n in run.notes)]
    return "\n".join(lines) + "\n"


def metadata() -> list[str]:
    def out(*argv: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"({e})"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, timeout=10).returncode != 0
    return [f"date: {datetime.now().astimezone():%F %T %Z}",
            f"command: `{' '.join([Path(sys.executable).name, 'bench/smb_copy.py', *sys.argv[1:]])}`",
            f"git: {out('git', 'rev-parse', '--short', 'HEAD')}{'+dirty' if dirty else ''}",
            f"machine: {out('uname', '-r')}, {out('nproc')} CPUs, load average {out('cat', '/proc/loadavg')}",
            f"versions: {out('smbd', '-V')}, {out('ssh', '-V')}, Python {sys.version.split()[0]}"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition (unless --reps says otherwise)")
    parser.add_argument("--reps", type=int, help="copies each way per path (default 3, --quick 1)")
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--paths", default=",".join(ALL_PATHS), help=f"subset of {','.join(ALL_PATHS)}")
    parser.add_argument("--copy-timeout", type=float, default=300, help="seconds one copy may take (default 300)")
    parser.add_argument("--max-minutes", type=float, default=30, help="the whole run's budget (default 30)")
    parser.add_argument("--quiet-pct", type=float, default=30,
                        help="before each copy wait until the machine is busy less than this %% of a core")
    parser.add_argument("--quiet-max", type=float, help="... at most this many seconds (default 10, --quick 3)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    args.reps = args.reps or (1 if args.quick else 3)
    args.quiet_max = args.quiet_max if args.quiet_max is not None else (3 if args.quick else 10)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = set(args.paths) - set(ALL_PATHS)
    if unknown or args.reps < 1 or args.mib < 1:
        parser.error(f"--paths: unknown {sorted(unknown)} (known: {','.join(ALL_PATHS)})" if unknown
                     else "--reps and --mib must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally below
    stamp = time.strftime("%F-%H%M%S")
    results = HERE / "results"
    raw = results / f"{stamp}-smb-copy.raw"
    raw.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-smb."))
    (work / "gw").mkdir()
    gw = Gateway(work / "gw")
    samba = ssh = None
    run = Run()
    try:
        samba = Samba(work / "samba")
        paths = []
        if "direct" in args.paths:
            paths.append(Route("direct", samba.port, {}))
        if "sshRnd" in args.paths:
            try:
                ssh = SshTunnel(work, "sshRnd", samba.port)
                paths.append(Route("sshRnd", ssh.port, ssh.pids))
            except RuntimeError as e:
                run.failures["sshRnd"] = str(e)
        if {"gateway", "access"} & set(args.paths):
            try:
                paths += [p for p in start_gateway(gw, samba, work, "access" in args.paths) if p.name in args.paths]
            except AssertionError as e:   # the harness's deadlines and checks
                run.failures.update({name: f"did not start: {e}" for name in ("gateway", "access")})
        for path in paths:
            try:
                check_reachable(samba, path)
            except AssertionError as e:
                run.failures[path.name] = f"not reachable: {e}"
        measure(samba, paths, work, args, run)
        text = report(run, args.paths, args, metadata())
        print(text)
        (results / f"{stamp}-smb-copy.md").write_text(text)
        print(f"written: {results / f'{stamp}-smb-copy.md'}", file=sys.stderr)
    finally:
        if ssh is not None:
            ssh.stop()
        gw.cleanup()
        if samba is not None:
            samba.stop()
        for log in [*work.glob("*.log"), *(work / "gw").glob("**/*.log"), *(work / "gw").glob("**/*.toml"),
                    *(work / "sshRnd" / "logs").glob("*"), *(work / "samba" / "log").glob("*")]:
            if log.is_file():
                shutil.copy(log, raw / f"{log.parent.name}-{log.name}")
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
