"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary directory,
listening on a free high port of 127.0.0.1 only, one per test session.

initdb refuses to run as root, and CI runs as root: then the cluster belongs to the
`postgres` system user (the Debian package makes it) and every server command runs through
``runuser -u postgres --`` in a directory that user owns; otherwise it runs as the current
user. Tests get a fresh database each (``cluster.new_database()``), so they never see each
other's rows; ``store_backend`` runs a store test once on SQLite and once on PostgreSQL. The server binaries are found through scripts/packages.txt's ``postgresql``
component (require("postgresql")), whatever the installed major version.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from attrs import define, field, frozen

from components import require, require_module
from ports import free_port

SUPERUSER = "gateway_test"
SERVER_USER = "postgres"  # who runs the cluster when the tests run as root


@define
class PostgresCluster:
    """One running cluster; `url(database)` is what `[service] store` would say."""

    bin_dir: Path
    root: Path
    port: int
    _run_as: list[str] = field(factory=list)
    _shared_database: str = ""

    @classmethod
    def start(cls) -> "PostgresCluster":
        """initdb and start a cluster in a new temporary directory; stop() removes it."""
        bin_dir = Path(require("postgresql")).parent
        root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        run_as: list[str] = []
        if os.geteuid() == 0:
            server = pwd.getpwnam(SERVER_USER)
            os.chown(root, server.pw_uid, server.pw_gid)
            run_as = ["runuser", "-u", SERVER_USER, "--"]
        cluster = cls(bin_dir, root, free_port(), run_as)
        cluster._initdb()
        cluster.resume()
        return cluster

    def resume(self) -> None:
        """Start the server (again, after halt()) on the same port and data directory."""
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.root / "server.log"),
                     "-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories="
                           f"{self.root} -c fsync=off -c full_page_writes=off -c max_connections=100")

    def halt(self) -> None:
        """Stop the server at once (a store outage), keeping its data for resume()."""
        self._pg_ctl("stop", "-m", "immediate", "-w")

    def url(self, database: str = "postgres") -> str:
        """A password-less postgresql:// URL of `database` (the test superuser trusts 127.0.0.1)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database's URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def new_schema(self) -> str:
        """The URL of a new empty schema in one shared database: as good as a new database for a
        store (its tables go in the first schema of search_path) and ten times quicker to make."""
        if not self._shared_database:
            self._shared_database = self.new_database()
        name = f"s_{uuid.uuid4().hex[:16]}"
        self.sql(f'CREATE SCHEMA "{name}"', self._shared_database.rpartition("/")[2])
        return f"{self._shared_database}?options=-csearch_path%3D{name}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement as the superuser, outside a transaction (CREATE DATABASE needs that)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)

    def require_passwords_for(self, role: str) -> None:
        """Make `role` log in with its password over TCP (everyone else stays trusted)."""
        hba = self.root / "data" / "pg_hba.conf"
        owner = hba.stat()
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        os.chown(hba, owner.st_uid, owner.st_gid)  # the server's user must still read it
        self._pg_ctl("reload")

    def stop(self) -> None:
        """Stop the server at once (unless a test halted it) and remove its directory."""
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _initdb(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.root / "data"), "-U", SUPERUSER,
                  "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args)

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._run_as, *command], cwd=self.root, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")


@pytest.fixture(scope="session")
def postgres_cluster():
    """The session's PostgreSQL cluster, started on first use and removed at the end."""
    require_module("psycopg")
    cluster = PostgresCluster.start()
    yield cluster
    cluster.stop()


@frozen
class StoreBackend:
    """One database of one backend; open() makes another store object on it (another node)."""

    name: str
    target: str  # a SQLite file's path or a postgresql:// URL

    def open(self):
        if self.name == "sqlite":
            from gateway.store.sqlite import SQLiteStore

            return SQLiteStore(self.target)
        from gateway.store.postgresql import PostgreSQLStore

        return PostgreSQLStore(self.target)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request, tmp_path) -> StoreBackend:
    """A fresh empty database on each store backend in turn: the store tests run on both."""
    if request.param == "sqlite":
        return StoreBackend("sqlite", str(tmp_path / "gateway.db"))
    return StoreBackend("postgresql", request.getfixturevalue("postgres_cluster").new_schema())
