"""The MLflow store a command uses: its URI, the checks run before anything starts, a client, an experiment.

`resolve_tracking_uri` picks the URI (explicit > `MLFLOW_TRACKING_URI` > `sqlite:///<abs workdir>/mlflow.db`) and
makes it absolute; `check_store` refuses, writing nothing, a store the command cannot use; `open_client` binds an
`MlflowClient` to it (a network store's client rides out an outage: `outage.PatientClient`), and
`get_or_create_experiment` tolerates processes racing to create the same experiment.

The checks need no MLflow:
- A network store (http(s), postgresql, mysql, mssql) gets one TCP connect with a short timeout: MLflow's own
  client retries an unreachable server with back-off for minutes, then prints a long traceback.
- A sqlite store must be an SQLite file (MLflow's schema set-up would otherwise leave a `.lock` beside, say, a CSV
  passed by mistake), and a folder outside the workdir is never created for it.
Messages name scheme, host and port only: credentials in a database URI are never shown.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cleansweep.errors import UserError
from cleansweep.runtime import layout
from cleansweep.tracking import outage
from cleansweep.tracking.outage import ServerUnreachable

_NETWORK_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
_REACHED: set[tuple[str, int]] = set()
PROBE_TIMEOUT_S = 3.0
SQLITE_MAGIC = b"SQLite format 3\x00"


_STORE_SCHEMES = {"sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc"}


def resolve_tracking_uri(explicit: str | None, workdir: Path, env: Mapping[str, str] | None = None) -> str:
    """The tracking URI every process of a run uses, made absolute.

    A relative sqlite URI is resolved against the CWD of the process that opens it (MLflow's own default is the
    relative `sqlite:///mlflow.db`, `mlflow/store/tracking/__init__.py`), and Ray Tune and Train move every trial
    worker into its trial directory (`RAY_CHDIR_TO_TRIAL_DIR`, `ray/train/constants.py`): a worker would open
    another database than the driver. So a sqlite path is anchored to the workdir here, once, for every process.

    Args:
        explicit: `mlflow.tracking_uri` from the config or a flag; wins when set.
        workdir: Working directory; the default store is `<workdir>/mlflow.db` (sqlite, never the file store).
        env: Environment to read `MLFLOW_TRACKING_URI` from (default `os.environ`).

    Returns:
        A URI such as `sqlite:////abs/path/mlflow.db` or `http://127.0.0.1:5000`.
    """
    env = os.environ if env is None else env
    uri = explicit or env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / layout.MLFLOW_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///rel.db is relative to the CWD, which differs in Ray workers: anchor it to the workdir.
        rel = uri[len("sqlite:///"):]
        uri = f"sqlite:///{(Path(workdir) / rel).resolve()}"
    elif "://" not in uri:
        raise UserError(f"tracking URI {uri!r} has no scheme; use sqlite:///PATH.db or http://HOST:PORT")
    elif uri.startswith("file:") or uri.startswith("/"):
        raise UserError(f"tracking URI {uri!r} is the deprecated file store; use sqlite:///PATH.db or http://HOST:PORT")
    elif uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        raise UserError("a sqlite tracking URI names a file: write sqlite:///relative.db or sqlite:////abs/path.db")
    elif uri.split("://")[0].split("+")[0] not in _STORE_SCHEMES:
        raise UserError(f"tracking URI scheme {uri.split('://')[0]!r} is not an MLflow store; use sqlite:///PATH.db, "
                        "http(s)://HOST:PORT or a database URI (postgresql://, mysql://)")
    return uri


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


# ------------------------------------------------------------------------------------------------ client, experiment
_SQLITE_READY: set[str] = set()
# Creating a fresh store logs its schema steps at INFO on stderr, where a command's only line should be its error.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# A database error (say, a full disk) is logged there with its traceback and then raised; the raised error is what
# the command reports (one line), so the log copy would only bury it.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def open_client(uri: str, *, schema_ready: bool = False, wait_for_server: bool = False) -> MlflowClient:
    """A client bound to `uri` (for sqlite: the folder created and the database schema ready).

    `schema_ready=True` (sweep trials: their driver opened the database before starting any) skips the lock, so
    trials starting together do not queue behind each other's store set-up. A network store's client rides out
    an outage once the command runs (`outage.PatientClient`); its first check fails in seconds, unless
    `wait_for_server` (trials of a started sweep: the server may be restarting) waits for it too.
    """
    if not uri.startswith("sqlite:///"):
        label = server_label(uri)
        if wait_for_server:
            outage.call_patiently(probe_server, uri, what=label)
        else:
            probe_server(uri)
        return outage.PatientClient(MlflowClient(tracking_uri=uri), label)
    if uri in _SQLITE_READY or schema_ready:  # MLflow keeps one store per URI per process: the schema step is done
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///"):])
    check_sqlite_file(db)  # before the lock file: a refusal writes nothing beside someone's CSV
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a sqlite schema on first use; two processes doing it at once (a sweep and a
    # reader, or `cleansweep ui`) corrupt the alembic version row and crash one of them. Serialise that step.
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # builds the store: schema creation/migration under the lock
    _SQLITE_READY.add(uri)
    return client


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    # MLflow's sqlite default artifact root is ./mlruns of the CWD at the time; keep artifacts beside the database.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / layout.MLFLOW_ARTIFACTS / experiment).as_uri()
    return None  # a tracking server decides (and proxies) artifact storage


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Return the id of experiment `name`, creating it if needed; safe when processes race to create it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_default_artifact_location(
                client.tracking_uri, name))
        except MlflowException:
            # Another process created it between our lookup and our create: experiment names are unique in the
            # store, and MLflow turns the database's IntegrityError into MlflowException(RESOURCE_ALREADY_EXISTS)
            # (`SqlAlchemyStore.create_experiment`, mlflow/store/tracking/sqlalchemy_store.py).
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                        "or choose another experiment name")
    return exp.experiment_id
