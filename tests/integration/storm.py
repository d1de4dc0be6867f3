"""Many simulated connectors in one process, for the reconnect-storm test.

    python storm.py register SERVICE_STATE_DIR HOST:PORT BASE_DIR N
        makes N tokens straight in the service's store and enrols N connectors concurrently
    python storm.py run BASE_DIR N BACKOFF_INITIAL BACKOFF_MAX LOG_FILE
        runs N ConnectorNodes (one tunnel each) on one reactor, logging JSON lines to LOG_FILE
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogBeginner

from gateway import logs, plugins
from gateway.config import parse_config
from gateway.connector.identity import ConnectorIdentity
from gateway.connector.node import ConnectorNode
from gateway.connector.register import register
from gateway.pki.ca import CertificateAuthority
from gateway.pki.tokens import EnrolmentToken, hash_secret
from gateway.store.records import TokenRecord
from gateway.store.sqlite import SQLiteStore


def make_tokens(service_state: Path, n: int) -> list[str]:
    ca = CertificateAuthority.load_or_create(service_state)
    store = SQLiteStore(service_state / "gateway.db")
    now = datetime.now(UTC)
    tokens = []
    for _ in range(n):
        token = EnrolmentToken.generate(ca.fingerprint)
        store.create_token(TokenRecord(token_id=token.token_id, secret_hash=hash_secret(token.secret),
                                       group="default", created_at=now, expires_at=now + timedelta(hours=1)))
        tokens.append(token.encode())
    store.close()
    return tokens


async def register_all(service_state: Path, address: str, base: Path, n: int) -> None:
    tokens = make_tokens(service_state, n)
    sem = defer.DeferredSemaphore(20)
    await defer.gatherResults([
        sem.run(lambda i=i, t=t: defer.Deferred.fromCoroutine(
            register(reactor, address, t, base / f"sim{i}", name=f"sim{i}")))
        for i, t in enumerate(tokens)
    ])


def run_all(base: Path, n: int, initial: float, maximum: float, log_file: Path) -> None:
    out = open(log_file, "w", buffering=1)
    globalLogBeginner.beginLoggingTo([logs.make_observer("json", "info", out)], redirectStandardIO=False)
    pm = plugins.make_plugin_manager()
    handlers = plugins.protocol_handlers(pm)
    for i in range(n):
        state = base / f"sim{i}"
        config = parse_config({"connector": {"state_dir": str(state), "tunnels": 1, "backoff_initial": initial,
                                             "backoff_max": maximum}}, str(base / "storm.toml"))
        ConnectorNode(config, reactor, pm, handlers, ConnectorIdentity.load(state)).startService()
    reactor.run()


def main(argv: list[str]) -> None:
    if argv[1] == "register":
        task.react(lambda _: defer.Deferred.fromCoroutine(
            register_all(Path(argv[2]), argv[3], Path(argv[4]), int(argv[5]))))
    else:
        run_all(Path(argv[2]), int(argv[3]), float(argv[4]), float(argv[5]), Path(argv[6]))


if __name__ == "__main__":
    main(sys.argv)
