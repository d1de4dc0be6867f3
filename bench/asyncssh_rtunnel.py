#!/usr/bin/env python3
# Adapted from the project's shared recipes.
"""asyncssh_rtunnel.py server DIR SSHPORT
   asyncssh_rtunnel.py client DIR SSHPORT RPORT:LPORT [...]

A pure-Python (asyncio + asyncssh) equivalent of `sshd` + `ssh -R`:
  server = relay: SSH server on 127.0.0.1:SSHPORT, key auth against
           DIR/authorized_keys, host key DIR/hostkey; grants remote
           port-forward requests for 127.0.0.1 only.
  client = connector: dials the relay, asks it to listen on 127.0.0.1:RPORT and
           forward every accepted connection back over the one SSH connection
           (one SSH channel per TCP stream) to 127.0.0.1:LPORT.
Negotiated cipher is printed to stderr. Runs until killed.
"""
import asyncio, sys
import asyncssh

role, keydir, sshport = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Relay(asyncssh.SSHServer):
    def server_requested(self, listen_host, listen_port):
        return listen_host in ("127.0.0.1", "localhost")


async def server():
    await asyncssh.create_server(
        Relay, "127.0.0.1", sshport,
        server_host_keys=[f"{keydir}/hostkey"],
        authorized_client_keys=f"{keydir}/authorized_keys")
    await asyncio.Event().wait()


async def client(specs):
    conn = await asyncssh.connect(
        "127.0.0.1", sshport, username="perf",
        client_keys=[f"{keydir}/clientkey"], known_hosts=None)
    print("asyncssh cipher:", conn.get_extra_info("send_cipher"),
          "mac:", conn.get_extra_info("send_mac"), file=sys.stderr, flush=True)
    for s in specs:
        r, l = (int(x) for x in s.split(":"))
        await conn.forward_remote_port("127.0.0.1", r, "127.0.0.1", l)
    await conn.wait_closed()


asyncio.run(server() if role == "server" else client(sys.argv[4:]))
