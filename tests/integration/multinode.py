"""A service of several nodes for the integration tests (issue 15): N real `twistd gateway`
service nodes on 127.0.0.1 ports sharing one PostgreSQL database and the CA files.

The first node makes the CA in its state_dir; every later node gets a copy of its ca.pem and
ca.key before it starts (as an admin copies the CA key file to each node: docs/operations.md,
*Several nodes*). Nodes write their row every `heartbeat` seconds, so a test waits for the
node list with `wait_nodes` rather than sleeping. The database is a fresh one on the session's
cluster (`multinode`), or on a cluster of the test's own that it may stop and start again
(`outage_multinode`: a store outage must not touch the other tests' cluster).
"""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest

from gateway_harness import Connector, Gateway, Service, wait_until

HEARTBEAT = 1.0  # seconds: nodes see each other (and a node gone) within a few of these
CA_FILES = ("ca.pem", "ca.key")
_NODES_LINE = re.compile(r"service nodes: (.*)")


class MultiNode:
    """Service nodes on one PostgreSQL store (`url`) and one CA; `postgres` is their cluster."""

    def __init__(self, gw: Gateway, postgres: Any, url: str, apps: list[dict[str, Any]] | None = None,
                 heartbeat: float = HEARTBEAT, service: dict[str, Any] | None = None) -> None:
        self.gw = gw
        self.postgres = postgres
        self.url = url
        self.apps = list(apps or [])
        self.heartbeat = heartbeat
        self.service_extra = dict(service or {})
        self.nodes: list[Service] = []

    def add_node(self, name: str | None = None, start: bool = True, apps: list[dict[str, Any]] | None = None,
                 **service: Any) -> Service:
        """A node on the shared store with the shared CA and (by default) the cluster's apps, each on
        a port of its own; started and listening unless start=False."""
        name = name or f"node{len(self.nodes) + 1}"
        svc = self.gw.service(apps=[dict(a) for a in (self.apps if apps is None else apps)], name=name, start=False,
                              service={"store": self.url, "heartbeat_interval": self.heartbeat,
                                       **self.service_extra, **service})
        if self.nodes:
            self.copy_ca(self.nodes[0], svc)
        self.nodes.append(svc)
        if start:
            svc.start()
        return svc

    def start(self, count: int, **service: Any) -> list[Service]:
        """Start `count` more nodes and wait until every node lists them all."""
        for _ in range(count):
            self.add_node(**service)
        self.wait_nodes()
        return self.nodes

    @staticmethod
    def copy_ca(source: Service, target: Service) -> None:
        """Give `target` the CA files of `source` (both keep them 0600 in their state_dir)."""
        target.state_dir.mkdir(parents=True, exist_ok=True)
        for name in CA_FILES:
            shutil.copy2(source.state_dir / name, target.state_dir / name)

    def node(self, name: str) -> Service:
        return next(n for n in self.nodes if n.name == name)

    def running(self) -> list[Service]:
        return [n for n in self.nodes if n.proc is not None and n.proc.running]

    def listed_by(self, node: Service) -> list[str]:
        """The node ids `node`'s current run last logged as the live nodes (its roster)."""
        lines = _NODES_LINE.findall(node.proc.log())
        if not lines or lines[-1] == "none":
            return []
        return sorted(entry.split(" ", 1)[0] for entry in lines[-1].split(", "))

    def wait_nodes(self, expected: list[str] | None = None, timeout: float = 30.0) -> None:
        """Wait until every running node lists exactly `expected` (default: the running ones)."""
        want = sorted(expected if expected is not None else [n.name for n in self.running()])
        wait_until(lambda: all(self.listed_by(n) == want for n in self.running()), timeout,
                   f"every running node to list the nodes {want}")

    def connector(self, node: Service, name: str | None = None, start: bool = True, **options: Any) -> Connector:
        """A connector enrolled through `node` (with a token made on it), configured and started."""
        return self.gw.connector(node, name=name, start=start, **options)

    def cli(self, node: Service, *args: str, **kwargs: Any):
        """`gateway ARGS --config NODE'S FILE` (the store is the shared one)."""
        return self.gw.cli(*args, "--config", str(node.config_path), **kwargs)


@pytest.fixture
def multinode(gw, postgres_cluster) -> MultiNode:
    """A service of several nodes on a fresh database of the session's PostgreSQL cluster; the
    test adds nodes (multinode.start(3) or add_node)."""
    return MultiNode(gw, postgres_cluster, postgres_cluster.new_database())


@pytest.fixture
def own_postgres(gw):
    """A PostgreSQL cluster of this test alone, which it may halt() and resume() (a store outage);
    the test's processes are stopped before it is, so they do not log an outage at the end."""
    from components import require_module
    from postgres import PostgresCluster

    require_module("psycopg")
    cluster = PostgresCluster.start()
    yield cluster
    gw.cleanup()
    cluster.stop()


@pytest.fixture
def outage_multinode(gw, own_postgres) -> MultiNode:
    """A service of several nodes whose PostgreSQL the test may stop and start (own_postgres)."""
    return MultiNode(gw, own_postgres, own_postgres.new_database())
