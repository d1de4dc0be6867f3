"""smbclient copies of one file, for the SMB benchmarks (bench/smb_copy.py, bench/smb_rdp_mixed.py).

The smbd is the test harness's (tests/integration/smb_rdp_harness.py ``Samba``); a copy is one
``smbclient -c "put ..."`` or ``"get ..."`` through a port (smbd's own, or a tunnel's), timed from
the client's start to its exit, so the figure includes the client's connect, NEGOTIATE and
SESSION_SETUP (well under 1 % of a 1 GiB copy on loopback).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

MIB = 1024 * 1024


class CopyFailed(Exception):
    """smbclient exited non-zero, ran past its deadline, or the copy's sha256 differs."""


def make_file(path: Path, mib: int) -> str:
    """Write ``mib`` MiB of random bytes to ``path``; its sha256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(MIB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


def gbit_per_s(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def copy(samba, port: int, direction: str, local: Path, remote: str, timeout: float) -> float:
    """Seconds one smbclient ``put`` (local file to the share's ``remote``) or ``get`` (the
    reverse) through 127.0.0.1:``port`` took; CopyFailed with smbclient's output if it failed."""
    command = f"put {local} {remote}" if direction == "put" else f"get {remote} {local}"
    start = time.monotonic()
    try:
        result = samba.client(port, command=command, timeout=timeout)
    except subprocess.TimeoutExpired as e:   # run() has killed smbclient
        raise CopyFailed(f"smbclient {direction} through port {port}: {e}") from None
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise CopyFailed(f"smbclient {direction} through port {port} exited {result.returncode}: "
                         f"{(result.stdout + result.stderr).strip()[-2000:]}")
    return elapsed
