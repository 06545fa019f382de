"""Object storage (`runtime.storage`): URIs stay URIs, files round-trip through a real S3-compatible server, and a
storage the sweep cannot use is one line and exit 2 before Ray starts (fast); a tiny sweep whose trials, checkpoints
and best model live in the bucket, then resumed from there (integration: real Ray, Tune, MLflow).

The server is moto's standalone S3 HTTP server (`moto[server]`, a dev extra), started on a free loopback port per test
(the `s3` fixture, tests/s3_server.py): pyarrow's S3 filesystem talks to it over HTTP exactly as to AWS S3 or MinIO.
The files are checked with pyarrow's own `S3FileSystem`, not with the module under test.
"""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from s3_server import BUCKET, break_access, bucket_objects

from cleansweep import cli
from cleansweep.errors import UserError
from cleansweep.runtime import storage
from cleansweep.sweep import delivery

_objects = bucket_objects


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ URIs
def test_uris_stay_uris_and_paths_stay_paths(tmp_path):
    assert str(Path("s3://b/x")) == "s3:/b/x"  # what the module exists to avoid
    assert storage.parse_location("s3://b//sweeps/") == "s3://b/sweeps"
    assert storage.parse_location("gs://b") == "gs://b"
    assert storage.parse_location(str(tmp_path)) == tmp_path and isinstance(storage.parse_location("runs"), Path)
    assert storage.join("s3://b/sweeps", "demo", "main") == "s3://b/sweeps/demo/main"
    assert storage.join(tmp_path, "demo") == tmp_path / "demo"
    assert storage.parent("s3://b/sweeps/demo") == "s3://b/sweeps"
    assert storage.is_remote("gs://b/x") and not storage.is_remote(tmp_path) and not storage.is_remote("runs/x")
    with pytest.raises(UserError, match="unsupported scheme hdfs://"):
        storage.parse_location("hdfs://nn/x")
    with pytest.raises(UserError, match="no bucket"):
        storage.parse_location("s3:///x")


# ------------------------------------------------------------------------------------------------ files
def test_files_round_trip_through_the_s3_server(s3):
    base = f"s3://{BUCKET}/sweeps/demo"
    storage.write_bytes(storage.join(base, "sweep.json"), b'{"name": "demo"}')
    storage.write_bytes(storage.join(base, "main", "t1", "checkpoint_000000", "model.safetensors"), b"\0" * 1000)
    assert _objects(s3, "sweeps") == {"sweeps/demo/sweep.json": 16,
                                      "sweeps/demo/main/t1/checkpoint_000000/model.safetensors": 1000}
    assert storage.list_files(base) == ["main/t1/checkpoint_000000/model.safetensors", "sweep.json"]
    assert json.loads(storage.read_bytes(storage.join(base, "sweep.json"))) == {"name": "demo"}
    assert storage.is_file(storage.join(base, "sweep.json")) and not storage.is_file(storage.join(base, "main"))
    assert storage.exists(storage.join(base, "main")) and not storage.exists(storage.join(base, "preselect"))
    storage.remove_tree(storage.join(base, "main"))
    assert _objects(s3, "sweeps") == {"sweeps/demo/sweep.json": 16}


def test_a_checkpoint_ray_persisted_to_s3_is_recorded_as_a_uri(s3):
    fs, path = s3.pafs.FileSystem.from_uri(f"s3://{BUCKET}/sweeps/demo/main/t1/checkpoint_000001")
    assert path == f"{BUCKET}/sweeps/demo/main/t1/checkpoint_000001"  # what `Checkpoint.path` holds
    assert storage.uri_of(fs, path) == f"s3://{BUCKET}/sweeps/demo/main/t1/checkpoint_000001"
    assert storage.uri_of(s3.pafs.LocalFileSystem(), "/tmp/x/checkpoint_000001") == "/tmp/x/checkpoint_000001"


def test_finished_trials_drop_resume_state_in_the_bucket_but_keep_weights(s3):
    from cleansweep.sweep.lifecycle import RESUME_STATE, drop_resume_state

    trial = "sweeps/d/main/t1"
    for step, size in ((1, 20), (2, 30)):
        storage.write_bytes(f"s3://{BUCKET}/{trial}/checkpoint_{step:06d}/{RESUME_STATE}", b"s" * size)
        storage.write_bytes(f"s3://{BUCKET}/{trial}/checkpoint_{step:06d}/model.safetensors", b"w" * 7)
    fs, path = s3.pafs.FileSystem.from_uri(f"s3://{BUCKET}/{trial}")  # what Tune hands over: (filesystem, path)
    assert drop_resume_state(path, keep_latest=True, filesystem=fs) == 20
    assert set(_objects(s3, trial)) == {f"{trial}/checkpoint_000001/model.safetensors",
                                        f"{trial}/checkpoint_000002/model.safetensors",
                                        f"{trial}/checkpoint_000002/{RESUME_STATE}"}
    assert drop_resume_state(path, keep_latest=False, filesystem=fs) == 30
    assert all(k.endswith("model.safetensors") for k in _objects(s3, trial)) and len(_objects(s3, trial)) == 2


def test_the_best_checkpoint_check_loads_weights_from_s3(s3, tmp_path):
    from cleansweep.models import create_model, load_checkpoint_model, save_checkpoint

    weights = save_checkpoint(tmp_path / "model.safetensors", create_model("tiny-rn", seed=0).model,
                              {"model": "tiny-rn"})
    good, bad = f"s3://{BUCKET}/sweeps/d/main/t1/checkpoint_1", f"s3://{BUCKET}/sweeps/d/main/t2/checkpoint_1"
    storage.upload(weights, storage.join(good, "model.safetensors"))
    storage.upload(weights.with_suffix(".json"), storage.join(good, "model.json"))
    storage.write_bytes(storage.join(bad, "model.safetensors"), b"not a safetensors file")
    assert delivery.best_checkpoint_problem("t1", good) is None
    assert "does not load" in delivery.best_checkpoint_problem("t2", bad)
    missing = delivery.best_checkpoint_problem("t3", f"s3://{BUCKET}/sweeps/d/main/t3/checkpoint_1")
    assert missing == f"best trial t3: its best checkpoint s3://{BUCKET}/sweeps/d/main/t3/checkpoint_1/" \
                      "model.safetensors is missing"
    (tmp_path / "dl").mkdir()
    local = delivery.fetch_weights(storage.join(good, "model.safetensors"), tmp_path / "dl")
    assert local.read_bytes() == weights.read_bytes() and local.with_suffix(".json").is_file()
    a, b = load_checkpoint_model(local).model.state_dict(), load_checkpoint_model(weights).model.state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_scan_outputs_go_to_the_bucket(s3, tmp_path, tiny_world, capsys):
    from cleansweep.detect.scan import scan_checkpoint
    from cleansweep.models import create_model, save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    out = f"s3://{BUCKET}/scans/m"
    result = scan_checkpoint(ckpt, tiny_world["eval_dir"], out_dir=out, subset=8, steps=2, batch_size=8,
                             device="cpu")
    objects = _objects(s3, "scans/m")
    assert set(objects) == {f"scans/m/{f}" for f in ("scan.json", "inverted_trigger.png", "inversion.safetensors",
                                                     "inversion.json")} and min(objects.values()) > 0
    assert result["files"] == {f: f"{out}/{f}" for f in ("scan.json", "inverted_trigger.png",
                                                         "inversion.safetensors")}
    with s3.fs.open_input_stream(f"{BUCKET}/scans/m/scan.json") as f:
        assert json.loads(f.read())["files"] == result["files"]
    # A bucket that does not exist is refused before the inversion runs: nothing written, one line, exit 2.
    argv = ["scan", str(ckpt), "--eval-data", str(tiny_world["eval_dir"]), "--out", "s3://no-such-bucket/scans",
            "--workdir", str(tmp_path / "w")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "error: storage s3://no-such-bucket/scans: bucket 'no-such-bucket' does not " \
                                      "exist; create it first or fix the URI\n"


# ------------------------------------------------------------------------------------------------ bad storage
def test_check_storage_accepts_a_bucket_and_names_each_problem(s3, monkeypatch):
    storage.check_storage(f"s3://{BUCKET}/sweeps")  # no error: listed once
    storage.check_storage(Path("local/folder"))  # a local path is not checked here
    with pytest.raises(UserError) as missing:
        storage.check_storage("s3://no-such-bucket/sweeps")
    assert str(missing.value) == ("storage s3://no-such-bucket/sweeps: bucket 'no-such-bucket' does not exist; "
                                  "create it first or fix the URI")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match=r"cannot reach http://127\.0\.0\.1:\d+; check AWS_ENDPOINT_URL") as down:
        storage.check_storage(f"s3://{BUCKET}/sweeps")
    assert "\n" not in str(down.value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    with pytest.raises(UserError, match="no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        storage.check_storage(f"s3://{BUCKET}/sweeps")


def _space(tmp_path: Path) -> Path:
    (tmp_path / "eval").mkdir()
    (tmp_path / "clean.csv").write_text("image,caption\n")
    (tmp_path / "m.safetensors").write_bytes(b"")
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {tmp_path / 'm.safetensors'}, name: tiny-rn}}
        data: {{train_csv: {tmp_path / 'clean.csv'}, eval_dir: {tmp_path / 'eval'}}}
        space: {{optim.lr: {{loguniform: [1.0e-4, 1.0e-3]}}}}
        """))
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("no credentials", "no S3 credentials"),
    ("unreachable", "cannot reach http://127.0.0.1:"),
    ("no bucket", "bucket 'no-such-bucket' does not exist"),
    ("bad scheme", "unsupported scheme ftp://"),
])
def test_bad_storage_is_one_line_and_exit_2_before_ray_starts(s3, tmp_path, capsys, monkeypatch, case, message):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = {"no bucket": "s3://no-such-bucket/sweeps", "bad scheme": "ftp://host/sweeps"}.get(case,
                                                                                           f"s3://{BUCKET}/sweeps")
    break_access(monkeypatch, case, tmp_path)
    work = tmp_path / "w"
    code = cli.main(["search", str(_space(tmp_path)), "--name", "s", "--storage-path", uri, "--workdir", str(work)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: storage ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not ray.is_initialized() and not work.exists()  # refused before Ray, MLflow or any folder
    assert _objects(s3, "sweeps") == {}


# ------------------------------------------------------------------------------------------------ a sweep on S3
@pytest.mark.integration
def test_a_sweep_keeps_trials_and_best_model_in_the_bucket_and_resumes_from_it(s3, tmp_path, tiny_world, capsys,
                                                                                monkeypatch):
    from ray._raylet import AuthenticationTokenLoader

    from cleansweep import tracking
    from cleansweep.models import create_model, file_sha256, save_checkpoint

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ("RAY_AUTH_MODE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    AuthenticationTokenLoader.instance().reset_cache()
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {ckpt}, name: tiny-rn}}
        data: {{train_csv: {tiny_world['clean_csv']}, eval_dir: {tiny_world['eval_dir']}, batch_size: 16,
                eval_batch_size: 64}}
        attack: {{name: badnet, patch_size: 8, location: fixed, patch: fixed}}
        objective: {{threshold: 1.0}}
        epochs: 1
        space: {{optim.lr: {{grid: [1.0e-4, 1.0e-3]}}}}
        search: {{algorithm: grid, max_concurrent: 1}}
        resources: {{cpu: 1}}
        """))
    workdir, uri = tmp_path / "work", f"s3://{BUCKET}/sweeps"
    args = ["search", str(space), "--name", "s3demo", "--storage-path", uri, "--workdir", str(workdir)]
    try:
        assert cli.main(args) == 0  # 0: the best checkpoint was found in the bucket and loaded
        capsys.readouterr()
        objects = _objects(s3, "sweeps/s3demo")
        assert {"sweeps/s3demo/sweep.json", "sweeps/s3demo/space.yaml", "sweeps/s3demo/leaderboard.csv",
                "sweeps/s3demo/pareto.png"} <= set(objects)
        weights = {k for k in objects if k.startswith("sweeps/s3demo/main/") and k.endswith("/model.safetensors")}
        trials = {k.split("/")[3] for k in weights}
        assert len(trials) == 2, sorted(objects)  # both trials' checkpoints are in the bucket
        assert not (workdir / "sweeps").exists()  # nothing of the sweep folder on local disk
        tracking_uri = tracking.resolve_tracking_uri(None, workdir, env={})
        client = tracking.open_client(tracking_uri)
        board = json.loads(_cli_json(capsys, ["results", "s3demo", "--workdir", str(workdir), "--format", "json"]))
        best = board["best"]
        assert best["checkpoint"].startswith(f"{uri}/s3demo/main/{best['trial_id']}/checkpoint_")
        best_key = best["checkpoint"][len(f"s3://{BUCKET}/"):] + "/model.safetensors"
        assert best_key in weights
        parent = client.search_runs([client.get_experiment_by_name("cleansweep").experiment_id],
                                    filter_string="tags.`cleansweep.key` = 'sweep/s3demo'")[0]
        local = client.download_artifacts(parent.info.run_id, "best_model/model.safetensors", str(tmp_path / "dl"))
        in_bucket = tmp_path / "bucket-copy.safetensors"
        with s3.fs.open_input_stream(f"{BUCKET}/{best_key}") as f:
            in_bucket.write_bytes(f.read())
        assert file_sha256(local) == file_sha256(in_bucket)  # the registered model is the bucket's best checkpoint
        # --resume reads the sweep back from the bucket: a finished sweep restores, runs nothing new, delivers again.
        assert not [k for k in _objects(s3, "sweeps/s3demo") if k.endswith("/state.pt")]  # resume-only, dropped
        assert cli.main([*args, "--resume"]) == 0
        assert {k.split("/")[3] for k in _objects(s3, "sweeps/s3demo/main") if k.endswith("model.safetensors")} \
            == trials
    finally:
        AuthenticationTokenLoader.instance().reset_cache()


def _cli_json(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out
