#!/usr/bin/env python3
"""SMB, RDP and HTTP through one connector, each alone and all at once (issue 11's mixed workload).

    .venv/bin/python bench/smb_rdp_mixed.py [--mib 256] [--rdp 20] [--duration 10] [--keep]

Starts, on 127.0.0.1 only, a private smbd, an Xvfb + freerdp-shadow-cli RDP server and nginx
(the test harness's classes, tests/integration/*_harness.py), one service with an smb app, an
rdp app and a web app on the http front door, and one connector. Then measures:

- SMB: smbclient get and put of a --mib file, direct to smbd and through the gateway (Gbit/s);
- RDP: --rdp concurrent `xfreerdp /sec:nla +auth-only` (TLS + CredSSP/NTLM) through the
  gateway (connects/s, all must succeed);
- HTTP: wrk -c50 for --duration seconds through the front door (requests/s);
- mixed: the three at once (wrk for --duration while the SMB get and the RDP connects run),
  each figure next to its solo figure, and the connector's CPU (utime+stime over the window).

Prints a Markdown table. Not compared with `ssh -R` here (bench/run measures the tunnel
against it); every process is stopped by its own id at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "support")]

from gateway_harness import HOST, Gateway, free_port, wait_until  # noqa: E402
from nginx_harness import Nginx  # noqa: E402
from smb_rdp_harness import RdpServer, Samba  # noqa: E402
from smb_transfer import MIB, CopyFailed, copy, gbit_per_s, make_file  # noqa: E402


def smb_copy(samba: Samba, port: int, work: Path, mib: int) -> dict[str, float]:
    """Gbit/s of one smbclient put and one get of a ``mib`` MiB file through ``port``."""
    source = work / "bench.bin"
    if not source.exists():
        make_file(source, mib)
    back = work / f"back-{port}.bin"
    remote = f"bench-{port}.bin"
    rates = {}
    for what, local in (("put", source), ("get", back)):
        try:
            rates[what] = gbit_per_s(mib * MIB, copy(samba, port, what, local, remote, timeout=600))
        except CopyFailed as e:
            raise SystemExit(str(e)) from None
    back.unlink()
    (samba.share / remote).unlink()
    return rates


def rdp_connects(rdp: RdpServer, port: int, work: Path, count: int) -> float:
    """Connects/s of ``count`` concurrent NLA auth-only sessions (each must succeed)."""
    def one(i: int) -> int | None:
        code, _ = rdp.client(port, "/sec:nla", "+auth-only", work=work / f"rdp-{port}-{i}", timeout=120)
        return code

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        codes = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - start
    if any(codes):
        raise SystemExit(f"xfreerdp +auth-only exit codes through {port}: {codes}")
    return count / elapsed


def wrk(port: int, host: str, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t2", "-c50", f"-d{seconds}s", "-H", f"Host: {host}", f"http://{HOST}:{port}/headers"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise SystemExit(f"wrk said: {out}")
    return float(match.group(1))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rdp", type=int, default=20)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-mixed."))
    (work / "gw").mkdir()
    gw = Gateway(work / "gw")
    servers = []
    try:
        samba = Samba(work / "samba")
        servers.append(samba)
        rdp = RdpServer(work / "rdp")
        servers.append(rdp)
        nginx = Nginx(work / "nginx", shutil.which("nginx") or "/usr/sbin/nginx")
        servers.append(nginx)
        front = free_port()
        web_host = f"web.bench.test:{front}"
        svc = gw.service([{"name": "files", "destination": f"{HOST}:{samba.port}", "protocol": "smb"},
                          {"name": "desktop", "destination": f"{HOST}:{rdp.port}", "protocol": "rdp"}], start=False)
        svc.add_front_door(front, [{"name": "web", "external_url": f"http://{web_host}/",
                                    "internal_url": f"http://{HOST}:{nginx.port}/"}])
        svc.start()
        conn = gw.connector(svc)
        smb_port, rdp_port = svc.app_port("files"), svc.app_port("desktop")
        wait_until(lambda: wrk(front, web_host, 1) > 0, 30, "the web app through the front door")

        rows = []
        direct = smb_copy(samba, samba.port, work, args.mib)
        solo_smb = smb_copy(samba, smb_port, work, args.mib)
        rows.append(("SMB put, Gbit/s", direct["put"], solo_smb["put"], None))
        rows.append(("SMB get, Gbit/s", direct["get"], solo_smb["get"], None))
        solo_rdp = rdp_connects(rdp, rdp_port, work, args.rdp)
        solo_http = wrk(front, web_host, args.duration)

        results: dict[str, float] = {}
        threads = [threading.Thread(target=lambda: results.update(http=wrk(front, web_host, args.duration))),
                   threading.Thread(target=lambda: results.update(smb=smb_copy(samba, smb_port, work, args.mib)["get"])),
                   threading.Thread(target=lambda: results.update(rdp=rdp_connects(rdp, rdp_port, work, args.rdp)))]
        cpu0, t0 = cpu_seconds(conn.proc.pid), time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu = (cpu_seconds(conn.proc.pid) - cpu0) / (time.monotonic() - t0)

        print(f"\n{args.mib} MiB SMB file, {args.rdp} RDP NLA auth-only connects, wrk -c50 {args.duration}s\n")
        print("| figure | direct | through the gateway, alone | mixed | mixed / alone |")
        print("|---|---|---|---|---|")
        for name, d, alone, _ in rows:
            print(f"| {name} | {d:.2f} | {alone:.2f} | | |")
        for name, alone, key in (("SMB get, Gbit/s", solo_smb["get"], "smb"), ("RDP connects/s", solo_rdp, "rdp"),
                                 ("HTTP requests/s", solo_http, "http")):
            print(f"| {name} (mixed run) | | {alone:.2f} | {results[key]:.2f} | {results[key] / alone:.2f}x |")
        print(f"\nconnector CPU during the mixed run: {cpu * 100:.0f}% of one core")
        print(f"connector session records: {conn.log().count(' spliced: ')} spliced,"
              f" {conn.log().count(' refused: ')} refused")
    finally:
        gw.cleanup()
        for server in reversed(servers):
            server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
