"""Record a TCP conversation as a fixture: how the SMB and RDP captures here were made.

    python record.py LISTEN_PORT TARGET_PORT OUT [MAX_BYTES]   # forward to 127.0.0.1:TARGET_PORT
    python record.py LISTEN_PORT - OUT [MAX_BYTES]             # no server: record what the client
                                                               # sends first, then close

Accepts one connection on 127.0.0.1:LISTEN_PORT and writes OUT, one line per chunk as it was
read: ``c HEX`` (client to server) or ``s HEX`` (server to client), in the order read.
Recording stops after MAX_BYTES (default 16384) in total; forwarding goes on unrecorded.
Loopback only; standard library only.
"""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> None:
    listen_port, target, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    budget = int(sys.argv[4]) if len(sys.argv) > 4 else 16384
    listener = socket.create_server(("127.0.0.1", listen_port))
    client, _ = listener.accept()
    listener.close()
    with open(out, "w") as record:
        _relay(client, target, budget, record)


def _relay(client: socket.socket, target: str, budget: int, record) -> None:
    """Relay (or only read) the one connection, writing each recorded chunk as it is read."""
    if target == "-":
        client.settimeout(3)
        data = b""
        try:
            data = client.recv(65536)
        except TimeoutError:
            pass
        record.write("c " + data.hex() + "\n")
        client.close()
    else:
        server = socket.create_connection(("127.0.0.1", int(target)))
        peers = {client: (server, "c"), server: (client, "s")}
        sel = selectors.DefaultSelector()
        for sock in peers:
            sel.register(sock, selectors.EVENT_READ)
        open_ = 2
        while open_:
            for key, _ in sel.select():
                src = key.fileobj
                dst, tag = peers[src]
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(src)
                    open_ -= 1
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                if budget > 0:
                    record.write(f"{tag} {data[:budget].hex()}\n")
                    record.flush()
                    budget -= len(data)
                try:
                    dst.sendall(data)
                except OSError:
                    return
        client.close()
        server.close()


if __name__ == "__main__":
    main()
