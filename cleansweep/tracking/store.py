"""Checks of an MLflow tracking URI that need no MLflow, run before a command starts anything and writing nothing.

- A network store (http(s), postgresql, mysql, mssql) gets one TCP connect with a short timeout: MLflow's own
  client retries an unreachable server with back-off for minutes, then prints a long traceback.
- A sqlite store must be an SQLite file (MLflow's schema set-up would otherwise leave a `.lock` beside, say, a CSV
  passed by mistake), and a folder outside the workdir is never created for it.
Messages name scheme, host and port only: credentials in a database URI are never shown.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from cleansweep.errors import UserError
from cleansweep.tracking.outage import ServerUnreachable

_NETWORK_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
_REACHED: set[tuple[str, int]] = set()
PROBE_TIMEOUT_S = 3.0
SQLITE_MAGIC = b"SQLite format 3\x00"


def _server_address(uri: str) -> tuple[str, int] | None:
    """(host, port) of a tracking URI served over the network (http(s), postgresql+driver, ...), else None."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in _NETWORK_PORTS:
        return None
    try:
        port = parts.port or _NETWORK_PORTS[scheme]
    except ValueError:
        raise UserError(f"tracking URI {scheme}://{parts.hostname}: its port is not a number in 1..65535; fix it") \
            from None
    if not parts.hostname:
        raise UserError(f"tracking URI {scheme}://... names no host; write e.g. http://127.0.0.1:5000")
    return parts.hostname, port


def probe_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """One TCP connect to a network tracking URI's server (once per process and address); UserError if it fails."""
    address = _server_address(uri)
    if address is None or address in _REACHED:
        return
    try:
        socket.create_connection(address, timeout=timeout_s).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ServerUnreachable(f"tracking server {urlsplit(uri).scheme}://{address[0]}:{address[1]} is unreachable "
                        f"({reason}); start it, or pass another --tracking-uri / MLFLOW_TRACKING_URI") from None
    _REACHED.add(address)


def server_label(uri: str) -> str:
    """`scheme://host:port` of a network tracking URI (no credentials, no path), else the scheme."""
    address = _server_address(uri)
    scheme = urlsplit(uri).scheme
    return f"{scheme}://{address[0]}:{address[1]}" if address else scheme


def check_sqlite_file(db: Path) -> None:
    """A sqlite store path must be absent, empty, or an SQLite database; read-only."""
    if db.is_dir():
        raise UserError(f"tracking URI sqlite:///{db} is a folder; name a .db file inside it")
    if db.is_file() and db.stat().st_size > 0:
        with open(db, "rb") as f:
            if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise UserError(f"{db} is not an SQLite database (an MLflow store); pass --tracking-uri "
                                "sqlite:///PATH.db naming a new or existing MLflow database")


def check_store(uri: str, workdir: Path, *, must_exist: bool = False) -> None:
    """Refuse, before anything starts and without writing, a store the command cannot use.

    Args:
        uri: From `resolve_tracking_uri`.
        workdir: The command's working directory: a sqlite database inside it may be created, elsewhere its folder
            must already exist (a typo must not create folders).
        must_exist: For commands that only read (results, report, ui): the database must already be there.
    """
    probe_server(uri)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    check_sqlite_file(db)
    if must_exist and not db.is_file():
        raise UserError(f"no MLflow database at {db}; run a sweep or pre-training first, or pass --tracking-uri / "
                        "set CLEANSWEEP_WORKDIR to the folder holding mlflow.db")
    if not db.parent.is_dir() and not db.parent.resolve().is_relative_to(Path(workdir).resolve()):
        raise UserError(f"folder {db.parent} of the tracking URI does not exist; create it (mkdir -p) or pass "
                        "another --tracking-uri")
