"""cleansweep.tracking against a real sqlite MLflow store (fast) and a real `mlflow server` over HTTP (integration)."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import cleansweep
from cleansweep import tracking
from cleansweep.errors import UserError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One database per module: creating the sqlite schema costs seconds, experiments keep tests apart.
    root = tmp_path_factory.mktemp("mlflow")
    uri = tracking.resolve_tracking_uri(None, root, env={})
    return uri, tracking.open_client(uri)


@pytest.fixture
def exp(store):
    uri, client = store
    return client, tracking.get_or_create_experiment(client, f"exp-{uuid.uuid4().hex[:8]}")


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------------ URIs
def test_uri_precedence(tmp_path):
    assert tracking.resolve_tracking_uri("http://h:1", tmp_path, env={"MLFLOW_TRACKING_URI": "http://e:2"}) \
        == "http://h:1"
    assert tracking.resolve_tracking_uri(None, tmp_path, env={"MLFLOW_TRACKING_URI": "http://e:2"}) == "http://e:2"
    assert tracking.resolve_tracking_uri(None, tmp_path, env={}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_relative_sqlite_made_absolute(tmp_path):
    uri = tracking.resolve_tracking_uri("sqlite:///sub/x.db", tmp_path, env={})
    assert uri == f"sqlite:///{tmp_path.resolve() / 'sub' / 'x.db'}"
    assert uri.startswith("sqlite:////")


@pytest.mark.parametrize("bad", ["mlruns", "file:///tmp/mlruns"])
def test_file_store_rejected(tmp_path, bad):
    with pytest.raises(UserError, match="sqlite"):
        tracking.resolve_tracking_uri(bad, tmp_path, env={})


# ------------------------------------------------------------------------------------------------ experiments
def test_experiment_get_or_create_is_idempotent(store):
    _, client = store
    name = f"idem-{uuid.uuid4().hex[:8]}"
    first = tracking.get_or_create_experiment(client, name)
    assert tracking.get_or_create_experiment(client, name) == first
    loc = client.get_experiment(first).artifact_location
    assert loc.startswith("file:///") and loc.endswith(f"mlartifacts/{name}")


def test_experiment_creation_race(store):
    uri, _ = store
    name = f"race-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(4)
    ids, errors = [], []

    def create():
        client = tracking.open_client(uri)
        barrier.wait()
        try:
            ids.append(tracking.get_or_create_experiment(client, name))
        except Exception as e:  # noqa: BLE001 - the test reports any failure below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(ids) == 4 and len(set(ids)) == 1


def test_processes_opening_a_fresh_sqlite_store_at_once(tmp_path):
    # MLflow migrates a fresh sqlite schema on first use; unserialised, concurrent first opens (a sweep driver and a
    # reader polling the same store) crashed one of them with an alembic "expected to match one row" error.
    uri = tracking.resolve_tracking_uri(None, tmp_path, env={})
    code = ("import sys; from cleansweep import tracking; c = tracking.open_client(sys.argv[1]); "
            "print(tracking.get_or_create_experiment(c, 'race'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, whoever created it


def test_deleted_experiment_is_a_user_error(store):
    _, client = store
    name = f"gone-{uuid.uuid4().hex[:8]}"
    client.delete_experiment(tracking.get_or_create_experiment(client, name))
    with pytest.raises(UserError, match="deleted"):
        tracking.get_or_create_experiment(client, name)


# ------------------------------------------------------------------------------------------------ runs
def test_start_run_resumes_by_key(exp):
    client, eid = exp
    a = tracking.start_run(client, eid, key="k/1", run_name="one", tags={"cleansweep.kind": "pretrain"})
    a.end("KILLED")
    b = tracking.start_run(client, eid, key="k/1", run_name="one")
    c = tracking.start_run(client, eid, key="k/2", run_name="two")
    assert b.run_id == a.run_id and c.run_id != a.run_id
    run = client.get_run(a.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags[tracking.KEY_TAG] == "k/1" and run.data.tags["cleansweep.kind"] == "pretrain"
    assert run.info.run_name == "one"
    assert len(client.search_runs([eid])) == 2


def test_parent_run_tag(exp):
    client, eid = exp
    parent = tracking.start_run(client, eid, key="sweep", run_name="s")
    child = tracking.start_run(client, eid, key="sweep/t1", run_name="s-t1", parent_run_id=parent.run_id)
    assert client.get_run(child.run_id).data.tags[tracking.PARENT_TAG] == parent.run_id


def test_metrics_one_point_per_step_across_resume(exp):
    client, eid = exp
    run = tracking.start_run(client, eid, key="m", run_name="m")
    assert run.last_step == -1
    assert run.log_metrics({"zeroshot_top1": 0.1, "feasible": True, "params": {"a": 1}, "note": "x"}, step=0)
    assert run.log_metrics({"zeroshot_top1": 0.2, "feasible": False}, step=5)
    assert not run.log_metrics({"zeroshot_top1": 9.9}, step=5)  # same step again: skipped

    resumed = tracking.RunHandle.reopen(run.tracking_uri, run.run_id)  # a new process after a crash
    assert resumed.last_step == 5
    assert not resumed.log_metrics({"zeroshot_top1": 9.9}, step=0)
    assert resumed.log_metrics({"zeroshot_top1": 0.3, "feasible": 1}, step=10)

    assert _history(client, run.run_id, "zeroshot_top1") == [(0, 0.1), (5, 0.2), (10, 0.3)]
    assert _history(client, run.run_id, "feasible") == [(0, 1.0), (5, 0.0), (10, 1.0)]
    assert _history(client, run.run_id, tracking.STEP_METRIC) == [(0, 0.0), (5, 5.0), (10, 10.0)]
    assert "params" not in client.get_run(run.run_id).data.metrics  # non-numbers are not metrics
    assert "note" not in client.get_run(run.run_id).data.metrics


def test_params_once_truncated_and_conflicts(exp):
    client, eid = exp
    run = tracking.start_run(client, eid, key="p", run_name="p")
    long = "x" * 7000
    written = run.log_params({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "note": long})
    assert set(written) == {"optim.lr", "optim.betas", "note"}
    stored = client.get_run(run.run_id).data.params
    assert stored["optim.lr"] == "0.001" and stored["optim.betas"] == "[0.9, 0.99]"
    assert len(stored["note"]) == 6000 and stored["note"].endswith(tracking.TRUNCATED_MARKER)
    assert stored["note"].startswith("x" * 5000)

    assert run.log_params({"optim": {"lr": 1e-3}, "note": long}) == {}  # same values: nothing written
    with pytest.raises(UserError, match="optim.lr"):
        run.log_params({"optim.lr": 2e-3})
    assert run.log_params({"optim.lr": 2e-3}, on_conflict="rename") == {"optim.lr.v2": "0.002"}
    assert run.log_params({"optim.lr": 2e-3}, on_conflict="rename") == {}
    assert run.log_params({"optim.lr": 3e-3}, on_conflict="rename") == {"optim.lr.v3": "0.003"}


def test_many_params_and_metrics_are_chunked(exp):
    client, eid = exp
    run = tracking.start_run(client, eid, key="big", run_name="big")
    run.log_params({f"p{i}": i for i in range(250)})
    run.log_metrics({f"m{i}": float(i) for i in range(1200)}, step=3)
    data = client.get_run(run.run_id).data
    assert len(data.params) == 250 and data.params["p249"] == "249"
    assert len(data.metrics) == 1201 and data.metrics["m1199"] == 1199.0


def test_tags_artifacts_and_status(exp, tmp_path):
    client, eid = exp
    run = tracking.start_run(client, eid, key="a", run_name="a")
    run.set_tags({"cleansweep.attack": "badnet", "n": 3})
    (tmp_path / "card.json").write_text("{}")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("x")
    run.log_artifact(tmp_path / "card.json")
    run.log_artifact(tmp_path / "dir", "folder")
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert names == {"card.json", "folder"}
    assert [a.path for a in client.list_artifacts(run.run_id, "folder")] == ["folder/x.txt"]
    run.end("FAILED")
    info = client.get_run(run.run_id)
    assert info.data.tags["n"] == "3" and info.info.status == "FAILED" and info.info.end_time
    for bad in ("DONE", "RUNNING"):  # a typo, and a status that does not end a run
        with pytest.raises(ValueError, match=f"^run status '{bad}' does not end a run; use one of FINISHED, FAILED, "
                                             "KILLED$"):
            run.end(bad)
    assert client.get_run(run.run_id).info.status == "FAILED"


@pytest.mark.parametrize(("exc", "status"), [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"),
                                             (RuntimeError, "FAILED")])
def test_context_manager_status(exp, exc, status):
    client, eid = exp
    run = tracking.start_run(client, eid, key=f"cm-{status}", run_name="cm")
    try:
        with run:
            if exc:
                raise exc
    except (KeyboardInterrupt, RuntimeError):
        pass
    assert client.get_run(run.run_id).info.status == status


def test_mark_stale_runs(exp):
    client, eid = exp
    mine = [tracking.start_run(client, eid, key=f"s{i}", run_name="s", tags={"cleansweep.sweep": "A"})
            for i in range(3)]
    other = tracking.start_run(client, eid, key="o", run_name="o", tags={"cleansweep.sweep": "B"})
    mine[2].end("FINISHED")
    marked = tracking.mark_stale_runs(client, eid, tags={"cleansweep.sweep": "A"}, exclude=[mine[1].run_id])
    assert marked == [mine[0].run_id]
    assert client.get_run(mine[0].run_id).info.status == "KILLED"
    assert client.get_run(mine[1].run_id).info.status == "RUNNING"
    assert client.get_run(mine[2].run_id).info.status == "FINISHED"
    assert client.get_run(other.run_id).info.status == "RUNNING"


# ------------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_real_mlflow_server_over_http(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            time.sleep(0.5)

        uri = tracking.resolve_tracking_uri(url, tmp_path, env={})
        client = tracking.open_client(uri)
        eid = tracking.get_or_create_experiment(client, "http-exp")
        run = tracking.start_run(client, eid, key="h", run_name="h", tags={"cleansweep.kind": "pretrain"})
        run.log_params({"optim": {"lr": 0.01}})
        for step, acc in [(0, 0.1), (4, 0.5)]:
            run.log_metrics({"zeroshot_top1": acc}, step=step)
        (tmp_path / "card.json").write_text('{"top1": 0.5}')
        run.log_artifact(tmp_path / "card.json")
        run.end("FINISHED")

        again = tracking.start_run(tracking.open_client(uri), eid, key="h", run_name="h")
        assert again.run_id == run.run_id and again.last_step == 4
        assert not again.log_metrics({"zeroshot_top1": 0.9}, step=4)
        got = client.get_run(run.run_id)
        assert got.data.params == {"optim.lr": "0.01"}
        assert _history(client, run.run_id, "zeroshot_top1") == [(0, 0.1), (4, 0.5)]
        assert [a.path for a in client.list_artifacts(run.run_id)] == ["card.json"]
        assert list((tmp_path / "artifacts").rglob("card.json"))  # proxied to the server's destination
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


# ------------------------------------------------------------------------------------------------ package shape
PACKAGE = Path(cleansweep.__file__).parent


def _mlflow_imports(source: str) -> list[int]:
    """Line numbers of the `import mlflow...` / `from mlflow... import` statements of a source text."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names)
            or isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "mlflow"]


def test_only_the_tracking_package_imports_mlflow():
    found = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if (lines := _mlflow_imports(p.read_text()))}
    outside = {path: lines for path, lines in found.items() if not path.startswith("tracking/")}
    assert outside == {}, "only cleansweep/tracking/ may import mlflow"
    assert {"tracking/store.py", "tracking/runs.py", "tracking/read.py"} <= set(found)  # the check sees imports


def test_the_mlflow_import_check_catches_every_form():
    source = "import os\nimport mlflow\nimport mlflow.entities as e\nfrom mlflow.tracking import MlflowClient\n" \
             "def f():\n    from mlflow import log_metric\nfrom .mlflow import x\nimport mlflowx\n"
    assert _mlflow_imports(source) == [2, 3, 4, 6]


def _top_level(path: Path) -> dict[str, set[str]]:
    """Names a module binds at top level: `imported` (from-imports) and `defined` (public functions and classes)."""
    body = ast.parse(path.read_text()).body
    return {"imported": {a.asname or a.name for n in body if isinstance(n, ast.ImportFrom) for a in n.names},
            "defined": {n.name for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef)
                        and not n.name.startswith("_")}}


def test_the_facade_lists_every_name_it_re_exports():
    facade = _top_level(PACKAGE / "tracking" / "__init__.py")
    assert sorted(facade["imported"] - {"annotations"}) == sorted(tracking.__all__)
    assert len(tracking.__all__) == len(set(tracking.__all__))
    assert all(hasattr(tracking, name) for name in tracking.__all__)


@pytest.mark.parametrize("module", ["store", "tags", "runs", "trials", "read", "registry", "server"])
def test_every_public_function_and_class_is_re_exported(module):
    defined = _top_level(PACKAGE / "tracking" / f"{module}.py")["defined"]
    assert defined and sorted(defined - set(tracking.__all__)) == []
    assert all(getattr(tracking, name) is getattr(getattr(tracking, module), name) for name in defined)
