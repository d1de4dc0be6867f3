"""Real SMB and RDP servers and clients on 127.0.0.1 for the smb and rdp plugin tests.

As in ../shared/recipes (smb_server.sh, rdp_server.sh, rdp_check.py): a private Samba ``smbd`` on
a free port with every directory in its own tmp dir and a tdbsam user (the current Unix user),
and an Xvfb + ``freerdp-shadow-cli`` RDP server with NLA (CredSSP/NTLM against a SAM file).
Every process is started in its own session (``start_new_session``) and stopped by its own
process id (smbd's group holds only smbd and the children it forked).
"""

from __future__ import annotations

import getpass
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from gateway_harness import HOST, free_port, listening, wait_until

SMB_PASS = "Smb-Secret-1"
RDP_USER = "rdpuser"
RDP_PASS = "Rdp-Secret-1"


def _stop(popen: subprocess.Popen, group: bool = False) -> None:
    if popen.poll() is not None:
        return
    if group:
        os.killpg(popen.pid, signal.SIGTERM)
    else:
        popen.terminate()
    try:
        popen.wait(5)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(popen.pid, signal.SIGKILL)
        else:
            popen.kill()
        popen.wait(5)


class Samba:
    """A throwaway smbd: share "share" (writable), user = the current Unix user with SMB_PASS.

    ``min_protocol`` NT1 lets the server speak SMB1 too (Samba 4.17 still can when told), so the
    gateway's allow_smb1 can be seen letting it through.
    """

    def __init__(self, root: Path, min_protocol: str = "NT1") -> None:
        self.dir = root
        self.port = free_port()
        self.user = getpass.getuser()
        self.share = root / "share"
        for d in ("share", "private", "lock", "state", "cache", "pid", "ncalrpc", "log", "binddns"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.share.chmod(0o1777)
        self.conf = root / "smb.conf"
        self.conf.write_text(f"""[global]
  netbios name = TESTSMB
  workgroup = TESTGROUP
  server role = standalone server
  security = user
  smb ports = {self.port}
  interfaces = {HOST}
  bind interfaces only = yes
  disable netbios = yes
  server min protocol = {min_protocol}
  private dir = {root}/private
  lock directory = {root}/lock
  state directory = {root}/state
  cache directory = {root}/cache
  pid directory = {root}/pid
  ncalrpc dir = {root}/ncalrpc
  binddns dir = {root}/binddns
  log file = {root}/log/log.%m
  max log size = 0
  passdb backend = tdbsam:{root}/private/passdb.tdb
  map to guest = Bad User
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  usershare path =
  kernel oplocks = no

[share]
  path = {root}/share
  read only = no
  guest ok = yes
  create mask = 0666
  directory mask = 0777
""")
        subprocess.run(["smbpasswd", "-c", str(self.conf), "-s", "-a", self.user],
                       input=f"{SMB_PASS}\n{SMB_PASS}\n", text=True, capture_output=True, check=True, timeout=30)
        self.log_path = root / "log" / "smbd.stdout"
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                ["smbd", "--foreground", "--no-process-group", "--debug-stdout", "-d", "1", "-s", str(self.conf)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: listening(self.port) or self.proc.poll() is not None, 20, "smbd to listen or exit")
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise AssertionError(f"smbd exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")

    def client(self, port: int, *args: str, command: str = "ls", timeout: float = 60) -> subprocess.CompletedProcess:
        """smbclient //127.0.0.1/share -p PORT as the share's user, running ``command``."""
        return subprocess.run(
            ["smbclient", f"//{HOST}/share", "-p", str(port), "-U", f"{self.user}%{SMB_PASS}",
             *args, "-c", command],
            capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    def stop(self) -> None:
        _stop(self.proc, group=True)


class RdpServer:
    """Xvfb on a free display and freerdp-shadow-cli on a free port, NLA only (+auth /sec:nla)."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        (root / "config").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.xvfb = self.shadow = None
        try:
            self.display = self._start_xvfb()
            sam = subprocess.run(["winpr-hash", "-u", RDP_USER, "-p", RDP_PASS, "-f", "sam"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout
            (root / "sam").write_text(sam)
            self.env = dict(os.environ, DISPLAY=self.display, HOME=str(root), XDG_CONFIG_HOME=str(root / "config"))
            self.log_path = root / "shadow.log"
            self._start_shadow()
        except BaseException:
            self.stop()
            raise

    def _start_xvfb(self) -> str:
        """Xvfb on a display it picks (-displayfd writes the number to a pipe); -noreset keeps it
        from resetting (and refusing connections a moment) when its last client leaves."""
        read_end, write_end = os.pipe()
        with open(self.dir / "xvfb.log", "w") as log:
            self.xvfb = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_end), "-nolisten", "tcp", "-noreset", "-screen", "0", "1024x768x24"],
                pass_fds=(write_end,), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        os.close(write_end)
        with os.fdopen(read_end) as numbers:
            ready, _, _ = select.select([numbers], [], [], 20)
            number = numbers.readline().strip() if ready else ""   # EOF (empty) if Xvfb died first
        if not number:
            raise AssertionError(f"Xvfb did not say which display it took (exit code {self.xvfb.poll()})")
        return ":" + number

    def _start_shadow(self) -> None:
        """freerdp-shadow-cli; started again (at most 3 times) if it could not open the display yet."""
        for _ in range(3):
            with open(self.log_path, "w") as log:
                self.shadow = subprocess.Popen(
                    ["freerdp-shadow-cli", f"/bind-address:{HOST}", f"/port:{self.port}", "+auth", "/sec:nla",
                     f"/sam-file:{self.dir / 'sam'}"],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            wait_until(lambda: listening(self.port) or self.shadow.poll() is not None, 30,
                       "the RDP shadow server to listen or exit")
            if self.shadow.poll() is None:
                return
            if "failed to open display" not in self.log_path.read_text():
                break
            time.sleep(0.2)
        raise AssertionError(f"freerdp-shadow-cli exited:\n{self.log_path.read_text()[-3000:]}")

    def client(self, port: int, *args: str, work: Path, until: str | None = None,
               timeout: float = 60) -> tuple[int | None, str]:
        """Run xfreerdp against 127.0.0.1:PORT; (exit code, its output). With ``until``, stop the
        client once its output shows that text (exit code None then)."""
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DISPLAY=self.display, HOME=str(work), XDG_CONFIG_HOME=str(work / "config"))
        log_path = work / "xfreerdp.log"
        with open(log_path, "w") as log:
            client = subprocess.Popen(["xfreerdp", f"/v:{HOST}:{port}", f"/u:{RDP_USER}", f"/p:{RDP_PASS}",
                                       "/cert:ignore", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while client.poll() is None and time.monotonic() < deadline:
                if until is not None and until in log_path.read_text(errors="replace"):
                    return None, log_path.read_text(errors="replace")
                time.sleep(0.1)
            return client.returncode, log_path.read_text(errors="replace")
        finally:
            _stop(client)

    def stop(self) -> None:
        for proc in (self.shadow, self.xvfb):
            if proc is not None:
                _stop(proc)
