"""A throwaway PostgreSQL server on loopback: `initdb` + `pg_ctl` in a temp folder, as an unprivileged user.

Used by the MLflow-on-PostgreSQL tests (a fixture) and by `.ci/run` (command line):

    python tests/pg_server.py start DIR    # prints postgresql://cleansweep:PASSWORD@127.0.0.1:PORT/mlflow
    python tests/pg_server.py stop DIR     # stops the server and deletes DIR

PostgreSQL refuses to run as root. As root, the server runs as the `postgres` system user (Debian's packages create
it), else as a `cleansweep-pg` system user made with `useradd`; DIR is handed to that user. Otherwise it runs as the
caller. It listens on 127.0.0.1 only, password (scram-sha-256) authentication, its Unix socket inside DIR.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

USER = "cleansweep"  # the database superuser made by initdb
DATABASE = "mlflow"
SYSTEM_USERS = ("postgres", "cleansweep-pg")  # tried in order when the caller is root
# A throwaway store on 2 shared cores: durability buys nothing, fsync per commit costs every MLflow write.
SETTINGS = {"listen_addresses": "'127.0.0.1'", "fsync": "off", "synchronous_commit": "off",
            "full_page_writes": "off", "max_connections": "100"}


@dataclass(frozen=True)
class PgServer:
    """A running server: its folder (data/, log, socket), port and superuser password."""

    root: Path
    port: int
    password: str

    @property
    def uri(self) -> str:
        """The SQLAlchemy/libpq URI of the `mlflow` database."""
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"


def find_bin(name: str) -> str:
    """Path of PostgreSQL program `name`: on PATH, else the newest /usr/lib/postgresql/N/bin (Debian's layout)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        raise RuntimeError(f"PostgreSQL's {name} not found on PATH or in /usr/lib/postgresql/*/bin; "
                           "install the server (apt-get install postgresql)")
    return max(candidates, key=lambda p: int(Path(p).parts[-3]))


def _run_as(uid: int) -> dict:
    """subprocess keyword arguments that run a PostgreSQL program as `uid` (switching only when we are root)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGDATA/PGPORT would override our flags
    if os.geteuid() != 0:
        return {"env": env}
    entry = pwd.getpwuid(uid)
    return {"env": {**env, "HOME": entry.pw_dir, "USER": entry.pw_name}, "user": uid, "group": entry.pw_gid,
            "extra_groups": []}


def server_uid() -> int:
    """The user the server runs as: the caller, or (as root) a system user, created if none exists."""
    if os.geteuid() != 0:
        return os.geteuid()
    for name in SYSTEM_USERS:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USERS[-1]],
                   check=True)
    return pwd.getpwnam(SYSTEM_USERS[-1]).pw_uid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initdb(root: Path, uid: int, password: str) -> Path:
    """A fresh cluster in root/data with superuser USER; returns the data folder."""
    data = root / "data"
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    os.chown(pwfile, uid, -1)
    try:
        subprocess.run([find_bin("initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-instructions"],
                       check=True, cwd=root, stdout=subprocess.DEVNULL, **_run_as(uid))
    finally:
        pwfile.unlink()
    return data


def _configure(data: Path, root: Path, port: int) -> None:
    settings = {**SETTINGS, "port": str(port), "unix_socket_directories": f"'{root}'"}
    with open(data / "postgresql.auto.conf", "a") as f:  # read after postgresql.conf: these win
        f.writelines(f"{key} = {value}\n" for key, value in settings.items())


def start(root: Path, attempts: int = 3) -> PgServer:
    """Initialise and start a server in the empty folder `root`, and create the `mlflow` database.

    Args:
        root: An existing, empty folder; it becomes the server user's (data/, postgres.log, the socket). As root,
            its parents must let that user through: a `tempfile.mkdtemp()` in /tmp does, pytest's tmp_path does not.
        attempts: Ports tried: another process may take the free port between the probe and the bind.

    Returns:
        The running server; `stop(root)` ends it.
    """
    uid = server_uid()
    os.chown(root, uid, -1)
    os.chmod(root, 0o700)
    password = secrets.token_hex(16)
    data = _initdb(root, uid, password)
    for attempt in range(attempts):
        port = _free_port()
        _configure(data, root, port)
        started = subprocess.run([find_bin("pg_ctl"), "start", "-w", "-t", "120", "-D", str(data), "-l",
                                  str(root / "postgres.log")], cwd=root, stdout=subprocess.DEVNULL,
                                 **_run_as(uid))
        if started.returncode == 0:
            break
        if attempt == attempts - 1:
            raise RuntimeError(f"PostgreSQL did not start: {(root / 'postgres.log').read_text()[-2000:]}")
    server = PgServer(root=root, port=port, password=password)
    # autocommit: CREATE DATABASE cannot run inside a transaction
    with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=password, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    return server


def stop(root: Path) -> None:
    """Stop the server in `root` (if it runs) and delete the folder."""
    data = root / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run([find_bin("pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)], cwd=root,
                       stdout=subprocess.DEVNULL, check=True, **_run_as(data.stat().st_uid))
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`start DIR` prints the URI; `stop DIR`."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/pg_server.py start|stop DIR", file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "start":
        print(start(root).uri)
    else:
        stop(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
