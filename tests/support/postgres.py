"""A private PostgreSQL server on loopback for tests and benchmarks: initdb into a temporary folder, start, stop.

As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root). The URL it returns uses
trust authentication on 127.0.0.1 and a port chosen free at start.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


class PostgresUnavailable(Exception):
    pass


def find_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    url: str
    port: int
    datadir: Path
    bindir: Path
    _as_user: list[str]

    def stop(self) -> None:
        subprocess.run([*self._as_user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                        "-w", "stop"], check=False, capture_output=True, timeout=60)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)

    def create_database(self, name: str) -> str:
        subprocess.run([*self._as_user, str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True, timeout=60)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


def start_postgres() -> PostgresServer:
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="meshloom-pg-"))
    datadir = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
    port = _free_port()
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=on -c max_connections=50"
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-o", options, "-l",
                        str(root / "log"), "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"could not start PostgreSQL: {exc.stderr.decode()[-500:]} {log[-500:]}") from exc
    server = PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", port, datadir, bindir,
                            as_user)
    return server
