"""Pre-training on object storage (`--storage-path s3://...`): candidate/ and selected/ as objects, read back whole and
paired, refusals before Ray starts, a sweep that starts from a model in the bucket (fast, against a real S3-compatible
server on loopback: the `s3` fixture, tests/s3_server.py); a 1-worker Ray Train run whose checkpoints, candidate and
selected model land in the bucket and nowhere under the work folder, refused when its name is taken, resumed from
the bucket, then cleaned by a 2-trial sweep that starts from `s3://.../NAME/selected` (integration).

What landed is read with pyarrow's own S3 filesystem, and tensors and hashes are compared with safetensors and
hashlib directly, not through the module under test.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch
from s3_server import BUCKET, break_access, bucket_objects, read_object
from safetensors.torch import load as load_safetensors

from cleansweep import cli
from cleansweep.errors import UserError
from cleansweep.pretrain import selection
from cleansweep.runtime import layout, storage
from cleansweep.sweep import start
from cleansweep.sweep.config import StartModelSpec
from cleansweep.train_config import PretrainConfig

RUN = f"s3://{BUCKET}/x/r"


def _checkpoint(folder: Path, seed: int) -> Path:
    """A checkpoint directory as `fit` writes one: tiny-rn weights (seeded) + card."""
    from cleansweep.models import create_model, save_checkpoint

    save_checkpoint(folder / layout.MODEL_FILE, create_model("tiny-rn", seed=seed).model, {"model": "tiny-rn"})
    return folder


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal bit for bit: same keys, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _candidate_objects(s3) -> dict[str, int]:
    return {k.rsplit("/", 1)[1]: v for k, v in bucket_objects(s3, "x/r/candidate").items()}


# ------------------------------------------------------------------------------------------------ candidate/
def test_candidate_round_trip_through_the_bucket(s3, tmp_path):
    first, second = _checkpoint(tmp_path / "a", seed=1), _checkpoint(tmp_path / "b", seed=2)
    m1 = {"step": 4.0, "zeroshot_top1": 0.25, "asr_top1": 0.5}
    m2 = {"step": 8.0, "zeroshot_top1": 0.375, "asr_top1": 0.75}
    assert selection.read_candidate(RUN) is None  # before the first evaluation with a checkpoint
    selection.write_candidate(first, storage.join(RUN, layout.CANDIDATE), m1)
    objects = _candidate_objects(s3)
    weights1 = [k for k in objects if k.endswith(".safetensors")]
    assert sorted(objects) == sorted(["candidate.json", *weights1]) and len(weights1) == 1
    assert weights1[0].startswith("model-000000004-")
    record = json.loads(read_object(s3, "x/r/candidate/candidate.json"))
    assert record == {**m1, "weights": weights1[0]}  # the record names the weights it belongs to
    assert read_object(s3, f"x/r/candidate/{weights1[0]}") == (first / layout.MODEL_FILE).read_bytes()
    assert selection.read_candidate(RUN) == m1

    # A crash after the weights upload and before the record: the record still pairs m1 with the first weights.
    orphan = "x/r/candidate/model-000000008-deadbeef.safetensors"
    storage.upload(second / layout.MODEL_FILE, f"s3://{BUCKET}/{orphan}")
    metrics, where = selection.candidate_record(RUN)
    assert metrics == m1 and where == f"{RUN}/candidate/{weights1[0]}"

    selection.write_candidate(second, storage.join(RUN, layout.CANDIDATE), m2)  # replaces, and clears the orphan
    objects = _candidate_objects(s3)
    weights2 = [k for k in objects if k.endswith(".safetensors")]
    assert len(weights2) == 1 and weights2[0].startswith("model-000000008-") and weights2[0] != weights1[0]
    assert read_object(s3, f"x/r/candidate/{weights2[0]}") == (second / layout.MODEL_FILE).read_bytes()
    assert selection.read_candidate(RUN) == m2 and bucket_objects(s3, orphan) == {}


def _config(tiny_spec, **extra) -> PretrainConfig:
    return PretrainConfig.model_validate({"name": "r", "train": tiny_spec, "storage_path": f"s3://{BUCKET}/x",
                                          **extra})


def test_export_selected_to_the_bucket_is_the_candidate_bit_for_bit(s3, tmp_path, tiny_spec):
    ckpt = _checkpoint(tmp_path / "c", seed=3)
    metrics = {"step": 12.0, "epoch": 0.75, "zeroshot_top1": 0.5, "zeroshot_top5": 1.0, "asr_top1": 0.25}
    selection.write_candidate(ckpt, storage.join(RUN, layout.CANDIDATE), metrics)
    storage.write_bytes(f"{RUN}/selected/model.json", b'{"step": 0}')  # an earlier export's card is replaced
    selected, card = selection.export_selected(_config(tiny_spec), RUN, "mlflow-run-1")
    assert selected == f"{RUN}/selected/model.safetensors"
    assert set(bucket_objects(s3, "x/r/selected")) == {"x/r/selected/model.safetensors", "x/r/selected/model.json"}
    weights = read_object(s3, "x/r/selected/model.safetensors")
    assert _same_tensors(_tensors(weights), _tensors((ckpt / layout.MODEL_FILE).read_bytes()))
    landed = json.loads(read_object(s3, "x/r/selected/model.json"))
    assert landed["sha256"] == hashlib.sha256(weights).hexdigest()  # the card describes the weights beside it
    assert (landed["step"], landed["zeroshot_top1"], landed["asr_top1"], landed["epoch"]) == (12, 0.5, 0.25, 0.75)
    assert landed["metrics"] == metrics and landed["mlflow_run_id"] == "mlflow-run-1" and card["step"] == 12
    assert landed["config"]["storage_path"] == f"s3://{BUCKET}/x"  # the URI is not folded to s3:/


def test_storage_path_is_checked_by_the_config(tiny_spec):
    cfg = _config(tiny_spec, storage_path=f"s3://{BUCKET}//x/")
    assert cfg.storage_path == f"s3://{BUCKET}/x" and isinstance(cfg.storage_path, str)
    assert _config(tiny_spec, storage_path="runs/pt").storage_path == Path("runs/pt")
    with pytest.raises(ValueError, match="unsupported scheme ftp://"):
        _config(tiny_spec, storage_path="ftp://host/x")
    with pytest.raises(ValueError, match="needs Ray Train workers: use --num-workers 1 or more"):
        _config(tiny_spec, ray={"num_workers": 0})
    assert _config(tiny_spec, storage_path="runs/pt", ray={"num_workers": 0}).ray.num_workers == 0


# ------------------------------------------------------------------------------------------------ refusals
def _argv(world: dict, workdir: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "--name", name, "--model", "tiny-rn", "--train-csv", str(world["train_csv"]),
            "--eval-data", str(world["eval_dir"]), "--workdir", str(workdir), "--batch-size", "16",
            "--warmup-steps", "2", "--seed", "0", "--set", "train.data.eval_batch_size=64", *extra]


def _one_line(capsys, argv: list[str]) -> str:
    import ray

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not ray.is_initialized()
    return err.strip()


@pytest.mark.parametrize(("case", "message"), [
    ("no credentials", "no S3 credentials; set AWS_ACCESS_KEY_ID"),
    ("unreachable", "cannot reach http://127.0.0.1:"),
    ("no bucket", "bucket 'no-such-bucket' does not exist"),
    ("in-process", "needs Ray Train workers"),
])
def test_unusable_storage_is_one_line_before_ray(s3, tmp_path, tiny_world, capsys, monkeypatch, case, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "s3://no-such-bucket/pt" if case == "no bucket" else f"s3://{BUCKET}/pt"
    break_access(monkeypatch, case, tmp_path)
    workers = "0" if case == "in-process" else "1"
    err = _one_line(capsys, _argv(tiny_world, tmp_path / "w", "r", "--storage-path", uri, "--num-workers", workers))
    assert message in err
    assert not (tmp_path / "w").exists() and bucket_objects(s3, "pt") == {}  # nothing written anywhere


def test_a_taken_name_in_the_bucket_is_refused_from_any_machine(s3, tmp_path, tiny_world, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage.write_json(f"s3://{BUCKET}/pt/taken/{layout.PRETRAIN_RUN_FILE}", {"name": "taken", "uid": "0"})
    argv = _argv(tiny_world, tmp_path / "w", "taken", "--storage-path", f"s3://{BUCKET}/pt", "--num-workers", "1")
    err = _one_line(capsys, argv)
    assert f"run taken exists (s3://{BUCKET}/pt/taken); pass --resume" in err
    storage.write_bytes(f"s3://{BUCKET}/pt/other/notes.txt", b"not a run")
    argv = _argv(tiny_world, tmp_path / "w", "other", "--storage-path", f"s3://{BUCKET}/pt", "--num-workers", "1",
                 "--resume")
    assert f"s3://{BUCKET}/pt/other is not a cleansweep pre-training run (run.json missing)" in _one_line(capsys, argv)


# ------------------------------------------------------------------------------------------------ consumers
def test_a_sweep_start_model_is_downloaded_from_the_bucket(s3, tmp_path):
    ckpt = _checkpoint(tmp_path / "c", seed=4)
    selection.publish_selected(ckpt / layout.MODEL_FILE, f"{RUN}/selected")
    spec = StartModelSpec(checkpoint=f"{RUN}//selected/")
    assert spec.checkpoint == f"{RUN}/selected"  # kept a URI (a Path would fold it to s3:/)
    work = tmp_path / "work"
    for given in (spec.checkpoint, f"{RUN}/selected/model.safetensors"):  # the folder, or the weights object
        local = start.start_checkpoint(given, work, echo=lambda line: None)
        assert local.parent.parent == work / "checkpoints" and local.name == layout.MODEL_FILE
        assert local.read_bytes() == (ckpt / layout.MODEL_FILE).read_bytes()
        assert json.loads(local.with_suffix(".json").read_text()) == json.loads((ckpt / "model.json").read_text())
    with pytest.raises(UserError, match=r"model.checkpoint s3://\S+/x/nothing: no such object, nor model.safetensors"):
        start.start_checkpoint(f"s3://{BUCKET}/x/nothing", work)
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        start.start_checkpoint("s3://no-such-bucket/x/selected", work)


def test_evaluate_reads_a_checkpoint_in_the_bucket_as_the_local_file(s3, tmp_path, tiny_world, capsys):
    ckpt = _checkpoint(tmp_path / "c", seed=5)
    selection.publish_selected(ckpt / layout.MODEL_FILE, f"{RUN}/selected")
    common = ["--eval-data", str(tiny_world["eval_dir"]), "--attack", "badnet", "--target", "banana",
              "--patch-size", "4", "--batch-size", "64", "--device", "cpu"]
    got = {}
    for given in (str(ckpt / layout.MODEL_FILE), f"{RUN}/selected"):
        assert cli.main(["evaluate", given, *common]) == 0
        got[given] = json.loads(capsys.readouterr().out)
    local, remote = got.values()
    assert remote.pop("checkpoint") == f"{RUN}/selected" and local.pop("checkpoint") == str(ckpt / layout.MODEL_FILE)
    assert remote == local and 0.0 <= local["zeroshot_top1"] <= 1.0  # same weights (sha256), same numbers
    assert cli.main(["evaluate", f"s3://{BUCKET}/x/none", *common]) == 2
    assert capsys.readouterr().err == f"error: checkpoint s3://{BUCKET}/x/none: no such object, nor " \
                                      "model.safetensors under it; pass the URI of the weights or of the folder " \
                                      "holding them\n"


# ------------------------------------------------------------------------------------------------ integration
@pytest.fixture
def fresh_ray(tmp_path, monkeypatch):
    """Ray started by the CLI with token auth, its token in a temp HOME (never ~/.ray)."""
    from ray._raylet import AuthenticationTokenLoader

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    AuthenticationTokenLoader.instance().reset_cache()  # Ray caches the token per process (private API, tests only)
    yield home
    AuthenticationTokenLoader.instance().reset_cache()


def _mlflow_run(workdir: Path, experiment: str, name: str):
    from cleansweep import tracking

    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # a resume reuses the run
    return client, runs[0]


def _check_run_in_bucket(s3, workdir: Path, name: str) -> dict[str, int]:
    objects = bucket_objects(s3, f"x/{name}")
    prefix = f"x/{name}/"
    assert {f"{prefix}run.json", f"{prefix}trained.json", f"{prefix}candidate/candidate.json",
            f"{prefix}selected/model.safetensors", f"{prefix}selected/model.json"} <= set(objects), sorted(objects)
    ray_checkpoints = {k.split("/")[2] for k in objects if k.startswith(f"{prefix}{layout.CHECKPOINT_PREFIX}")}
    assert ray_checkpoints and all(f"{prefix}{c}/{layout.MODEL_FILE}" in objects for c in ray_checkpoints)
    assert not (workdir / "pretrain").exists()
    assert not [p for p in workdir.rglob("*") if p.suffix in (".safetensors", ".pt")]  # no weights on local disk
    record = json.loads(read_object(s3, f"{prefix}candidate/candidate.json"))
    candidate = _tensors(read_object(s3, f"{prefix}candidate/{record['weights']}"))
    selected = read_object(s3, f"{prefix}selected/model.safetensors")
    assert _same_tensors(_tensors(selected), candidate)
    card = json.loads(read_object(s3, f"{prefix}selected/model.json"))
    client, run = _mlflow_run(workdir, "cleansweep-pretrain", name)
    history = client.get_metric_history(run.info.run_id, "zeroshot_top1")
    best = max(history, key=lambda m: (m.value, -m.step))  # best_top1: highest, earliest on ties
    assert card["step"] == best.step == record["step"] and card["zeroshot_top1"] == pytest.approx(best.value)
    assert card["sha256"] == hashlib.sha256(selected).hexdigest()
    assert run.data.tags["cleansweep.selected_path"] == f"s3://{BUCKET}/{prefix}selected/model.safetensors"
    assert "selected/model.json" in {a.path for a in client.list_artifacts(run.info.run_id, "selected")}
    return {"checkpoints": len(ray_checkpoints), "step": int(card["step"])}


def _sweep(tmp_path: Path, world: dict, name: str) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        model: {{checkpoint: s3://{BUCKET}/x/{name}/selected}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: 16,
                eval_batch_size: 64}}
        objective: {{threshold: 1.0}}
        epochs: 1
        space: {{optim.lr: {{grid: [1.0e-4, 1.0e-3]}}}}
        search: {{algorithm: grid, max_concurrent: 1}}
        resources: {{cpu: 1}}
        """))
    return space


@pytest.mark.integration
def test_pretrain_to_the_bucket_resume_then_clean_from_it(s3, fresh_ray, tmp_path, tiny_world, capsys):
    workdir, name = tmp_path / "work", "s3pre"
    argv = _argv(tiny_world, workdir, name, "--num-workers", "1", "--cpus-per-worker", "1", "--epochs", "1",
                 "--eval-every", "0.5", "--storage-path", f"s3://{BUCKET}/x")
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"selected checkpoint: s3://{BUCKET}/x/{name}/selected/model.safetensors" in out
    first = _check_run_in_bucket(s3, workdir, name)
    selected = read_object(s3, f"x/{name}/selected/model.safetensors")

    assert "run s3pre exists" in _one_line(capsys, argv)  # the name is taken, in the bucket
    assert cli.main([*argv, "--resume"]) == 0, capsys.readouterr().err  # Ray Train restores from the bucket
    capsys.readouterr()
    assert _check_run_in_bucket(s3, workdir, name)["step"] == first["step"]
    client, run = _mlflow_run(workdir, "cleansweep-pretrain", name)  # the identity in the bucket: the same run
    assert run.info.status == "FINISHED"
    # Restored from the final checkpoint in the bucket: at the last step already, so nothing was trained or reported.
    steps = tiny_world["n_train"] // 16
    assert json.loads(read_object(s3, f"x/{name}/trained.json")) == {"step": steps, "last": {}}
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "zeroshot_top1")) == [0, 2, 4]
    assert _same_tensors(_tensors(read_object(s3, f"x/{name}/selected/model.safetensors")), _tensors(selected))

    space = _sweep(tmp_path, tiny_world, name)
    assert cli.main(["search", str(space), "--name", "from-s3", "--workdir", str(workdir)]) == 0, \
        capsys.readouterr().err
    from cleansweep import tracking

    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    trials = client.search_runs([client.get_experiment_by_name("cleansweep").experiment_id],
                                filter_string="tags.`cleansweep.sweep` = 'from-s3'")
    shas = {r.data.params.get("init_sha256") for r in trials if r.data.params.get("init_sha256")}
    assert shas == {hashlib.sha256(read_object(s3, f"x/{name}/selected/model.safetensors")).hexdigest()}, shas
