"""A throwaway PostgreSQL server on loopback for the many-workers tests.

Debian's server package (``apt-get install postgresql``: .ci/run installs it) ships
``initdb`` and ``pg_ctl`` under /usr/lib/postgresql/<version>/bin. The server runs as the
``postgres`` user (initdb refuses root) from a fresh data folder, listens on 127.0.0.1 on
a free port with its socket in that folder, trusts local connections, and is stopped and
deleted afterwards. Where the binaries or the user are missing, ``start`` says why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def unavailable() -> str | None:
    """Why no server can be started here, or None."""
    if _binaries() is None:
        return "PostgreSQL's server is not installed (apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres user to run the server as"
    if os.geteuid() != 0:
        return "starting the server as the postgres user needs root"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                          capture_output=True, text=True, timeout=120)


@contextmanager
def server() -> Iterator[str]:
    """Start a server; yields its SQLAlchemy URL (database ``postgres``)."""
    bindir = _binaries()
    assert bindir is not None
    folder = tempfile.mkdtemp(prefix="autoscale-pg-")
    shutil.chown(folder, "postgres")
    data, port = os.path.join(folder, "data"), _free_port()
    _as_postgres([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres"])
    _as_postgres([f"{bindir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(folder, "log"),
                  "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{bindir}/pg_ctl", "-D", data,
                        "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
