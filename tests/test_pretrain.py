"""Pre-training driver: selection, resource checks and CLI errors (fast); real Ray Train runs (integration).

Integration tests start real Ray (a local `ray.init`, and a two-node `ray start` cluster) with token auth on and HOME
in a temp folder, log to a real sqlite MLflow store, and read every metric back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from cleansweep import cli, tracking
from cleansweep.cli import train as cli_train
from cleansweep.errors import UserError
from cleansweep.pretrain import driver as pretrain
from cleansweep.pretrain import selection, worker
from cleansweep.runtime import layout, scratch
from cleansweep.train_config import PretrainConfig, TrainSpec

RAY = str(Path(sys.executable).parent / "ray")  # the venv's CLI, so both nodes run this environment
EVAL_KEYS = ("zeroshot_top1", "zeroshot_top5", "asr_top1", "feasible", "best_feasible_top1", "epoch", "lr")
LOSS_KEYS = ("loss", "mmcl_loss")  # means since the previous evaluation: none at step 0


# ------------------------------------------------------------------------------------------------ selection
def _ev(step: int, top1: float) -> dict[str, float]:
    return {"step": float(step), "zeroshot_top1": top1, "asr_top1": 0.9}


@pytest.mark.parametrize(("rule", "ref", "expected_step"), [
    ("best_top1", None, 20),  # 0.6 at steps 20 and 40: the earliest wins
    ("closest_top1", 0.33, 10),  # |0.3 - 0.33| = 0.03 is the smallest gap
    ("last", None, 50),
])
def test_selector_rules(rule, ref, expected_step):
    history = [_ev(0, 0.05), _ev(10, 0.3), _ev(20, 0.6), _ev(30, 0.4), _ev(40, 0.6), _ev(50, 0.5)]
    sel = selection.Selector(rule, ref)
    taken = [ev["step"] for ev in history if sel.consider(ev)]
    assert sel.current["step"] == expected_step
    assert taken[-1] == expected_step


def test_selector_resumes_from_candidate_and_skips_nan():
    sel = selection.Selector("best_top1", current=_ev(20, 0.6))
    assert not sel.consider(_ev(30, 0.59))
    assert not sel.consider(_ev(40, float("nan")))
    assert sel.consider(_ev(50, 0.61)) and sel.current["step"] == 50


def test_selector_closest_needs_reference():
    with pytest.raises(UserError, match="reference"):
        selection.Selector("closest_top1")


# ------------------------------------------------------------------------------------------------ resources
def _nodes(*cpus_gpus):
    return [{"Alive": True, "Resources": {"CPU": c, **({"GPU": g} if g else {})}} for c, g in cpus_gpus] + \
        [{"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # dead nodes never count


def test_resources_fit_per_node():
    pretrain.check_resources(2, 1.0, False, _nodes((1, 0), (1, 0)))
    pretrain.check_resources(4, 0.5, False, _nodes((2, 0)))
    pretrain.check_resources(2, 1.0, True, _nodes((4, 1), (4, 1)))
    with pytest.raises(UserError, match=r"3 CPUs .*room for 1 such worker"):
        pretrain.check_resources(2, 1.5, False, _nodes((2, 0), (1, 0)))  # 3 CPUs in total, but 1.5 + 1.5 per node


def test_resources_errors_name_ask_have_and_fix():
    with pytest.raises(UserError) as e:
        pretrain.check_resources(64, 1.0, False, _nodes((2, 0)))
    msg = str(e.value)
    assert "--num-workers 64" in msg and "2 CPUs" in msg and "lower --num-workers" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"--use-gpu.*0 GPUs.*drop --use-gpu"):
        pretrain.check_resources(1, 1.0, True, _nodes((2, 0)))
    with pytest.raises(UserError, match=r"room for 1 such worker"):
        pretrain.check_resources(2, 1.0, True, _nodes((8, 1)))


def test_worker_user_error_becomes_one_line():
    from ray.train import ControllerError, WorkerGroupError

    bad = UserError("train.csv: missing column 'caption'; fix the CSV")
    wrapped = RuntimeError("actor died")
    wrapped.__cause__ = bad
    failed = WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: wrapped})
    assert pretrain._user_error_in(failed) is bad
    assert pretrain._user_error_in(WorkerGroupError("x", {0: RuntimeError("oom")})) is None
    assert pretrain._user_error_in(ControllerError(bad)) is bad


def test_objective_and_flat_metrics():
    assert worker.flat_metrics({"a": 1, "b": True, "params": {"x": 1}, "s": "x"}) == {"a": 1.0, "b": 1.0}


# ------------------------------------------------------------------------------------------------ CLI errors
@pytest.fixture
def fake_inputs(tmp_path):
    """Paths that exist (the driver checks existence before anything starts); contents are never read here."""
    csv = tmp_path / "data" / "train.csv"
    csv.parent.mkdir()
    csv.write_text("image,caption\n")
    (tmp_path / "data" / "eval").mkdir()
    return ["--train-csv", str(csv), "--eval-data", str(tmp_path / "data" / "eval"),
            "--workdir", str(tmp_path / "work")]


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # libraries may log above it; the error itself is one line
    assert last.startswith("error: ")
    return last


def test_cli_unknown_objective(capsys, fake_inputs):
    err = _one_line_error(capsys, ["pretrain", "--name", "r", "--objective", "ssl-only", *fake_inputs])
    assert "ssl-only" in err and "mmcl+ssl" in err


def test_cli_unknown_model(capsys, fake_inputs):
    err = _one_line_error(capsys, ["pretrain", "--name", "r", "--model", "tiny-rnn", *fake_inputs])
    assert "unknown model 'tiny-rnn'" in err and "tiny-rn" in err


def test_cli_missing_data(capsys, tmp_path, fake_inputs):
    argv = ["pretrain", "--name", "r", *fake_inputs, "--train-csv", str(tmp_path / "nope.csv")]
    assert "training CSV not found" in _one_line_error(capsys, argv)
    argv = ["pretrain", "--name", "r", *fake_inputs, "--eval-data", str(tmp_path / "noeval")]
    assert "evaluation folder not found" in _one_line_error(capsys, argv)
    assert "--train-csv" in _one_line_error(capsys, ["pretrain", "--name", "r", "--workdir", str(tmp_path)])


def test_cli_bad_values(capsys, fake_inputs, tmp_path):
    assert "name" in _one_line_error(capsys, ["pretrain", *fake_inputs])
    assert "--num-workers: -1 is out of range" in _one_line_error(capsys, ["pretrain", "--name", "r", "--num-workers",
                                                                          "-1", *fake_inputs])
    assert "ray.num_workers" in _one_line_error(capsys, ["pretrain", "--name", "r", "--set", "ray.num_workers=-1",
                                                         *fake_inputs])
    assert "reference_top1" in _one_line_error(capsys, ["pretrain", "--name", "r", "--selection", "closest_top1",
                                                        *fake_inputs])
    assert "unknown key" in _one_line_error(capsys, ["pretrain", "--name", "r", "--set", "train.optim.lrr=1",
                                                     *fake_inputs])
    assert "KEY=VALUE" in _one_line_error(capsys, ["pretrain", "--name", "r", "--set", "oops", *fake_inputs])
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert "invalid YAML" in _one_line_error(capsys, ["pretrain", str(tmp_path / "bad.yaml"), *fake_inputs])


def test_cli_yaml_then_flags(fake_inputs, tmp_path):
    (tmp_path / "c.yaml").write_text("name: from-yaml\ntrain:\n  epochs: 3\n  optim: {lr: 0.01}\n")
    args = cli.build_parser().parse_args(["pretrain", str(tmp_path / "c.yaml"), "--lr", "0.002",
                                          "--objective", "mmcl+ssl", "--set", "train.optim.weight_decay=0.2",
                                          *fake_inputs])
    cfg = cli_train.pretrain_config(args, tmp_path)
    assert isinstance(cfg, PretrainConfig)
    assert (cfg.name, cfg.train.epochs, cfg.train.optim.lr, cfg.train.optim.weight_decay) == ("from-yaml", 3, 0.002,
                                                                                              0.2)
    assert (cfg.train.method.mmcl_weight, cfg.train.method.ssl_weight) == (1.0, 1.0)
    assert selection.objective_name(cfg.train) == "mmcl+ssl"


def test_config_sources_in_order(fake_inputs, tmp_path):
    # Flags (None = not given) over the defaults, then --set over the flags; a key both value and section is refused.
    from cleansweep.pretrain.options import nest, pretrain_config

    flags = {"name": "r", "train.data.train_csv": Path(fake_inputs[1]), "train.data.eval_dir": fake_inputs[3],
             "train.optim.lr": 0.5, "train.epochs": None}
    cfg = pretrain_config(tmp_path, flags=flags, sets=["train.optim.lr=0.25", "train.optim.weight_decay=3"])
    assert (cfg.train.optim.lr, cfg.train.optim.weight_decay) == (0.25, 3.0)
    assert cfg.train.epochs == TrainSpec.model_fields["epochs"].default  # None: not given
    assert str(cfg.train.data.train_csv) == fake_inputs[1]
    assert nest({"a.b.c": 1, "a.d": 2}) == {"a": {"b": {"c": 1}, "d": 2}}
    with pytest.raises(UserError, match="train.optim.lr: optim is set both as a value and as a section"):
        nest({"train.optim": 1, "train.optim.lr": 2})


def test_existing_run_needs_resume(capsys, fake_inputs, tmp_path):
    (tmp_path / "work" / "pretrain" / "taken").mkdir(parents=True)
    err = _one_line_error(capsys, ["pretrain", "--name", "taken", *fake_inputs])
    assert "run taken exists" in err and "--resume" in err


# ------------------------------------------------------------------------------------------------ integration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_home(tmp_path, monkeypatch):
    """Token auth on, with the token in a temp HOME (never ~/.ray)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    return home


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local cluster in this process for the module (Ray caches the auth token per process, so one HOME).

    ray.init turns token auth on by default (Ray >= 2.60); the token lives in a temp HOME.
    """
    import ray

    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("ray-home")
        mp.setenv("HOME", str(home))
        for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
        # Ray caches the token per process (private API, tests only): read this HOME's, not an earlier module's.
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        assert os.environ.get("RAY_AUTH_MODE") == "token" and (home / ".ray" / "auth_token").is_file()
        try:
            yield ray
        finally:
            ray.shutdown()
            os.environ.pop("RAY_AUTH_MODE", None)  # ray.init set it for this process
            AuthenticationTokenLoader.instance().reset_cache()


def _pretrain_argv(world: dict, workdir: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "--name", name, "--model", "tiny-rn", "--train-csv", str(world["train_csv"]),
            "--eval-data", str(world["eval_dir"]), "--workdir", str(workdir), "--batch-size", "16",
            "--warmup-steps", "2", "--seed", "0", "--set", "train.data.eval_batch_size=64", *extra]


def _run_of(workdir: Path, name: str):
    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    exp = client.get_experiment_by_name("cleansweep-pretrain")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # a resume reuses the run
    return client, runs[0]


def _steps(client, run_id: str, key: str) -> list[int]:
    return [int(m.step) for m in client.get_metric_history(run_id, key)]


def _check_one_value_per_evaluation(client, run, expected_steps: list[int]) -> None:
    for key in EVAL_KEYS + LOSS_KEYS:
        steps = _steps(client, run.info.run_id, key)
        want = [s for s in expected_steps if s > 0] if key in LOSS_KEYS else expected_steps
        assert sorted(steps) == want, (key, sorted(steps))


def _eval_steps(rows: int, batch: int, epochs: int, every: float) -> list[int]:
    per_epoch = rows // batch
    total = per_epoch * epochs
    return sorted({0, total} | {s for s in range(1, total + 1)
                                if int(s / (every * per_epoch) + 1e-9) > int((s - 1) / (every * per_epoch) + 1e-9)})


def _check_selected(workdir: Path, name: str, client, run) -> dict:
    selected = workdir / "pretrain" / name / "selected"
    card = json.loads((selected / "model.json").read_text())
    assert (selected / "model.safetensors").is_file()
    history = client.get_metric_history(run.info.run_id, "zeroshot_top1")
    best = max(history, key=lambda m: (m.value, -m.step))  # best_top1: highest, earliest on ties
    assert card["step"] == best.step and card["zeroshot_top1"] == pytest.approx(best.value)
    asr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "asr_top1")}
    assert card["asr_top1"] == pytest.approx(asr[best.step])
    assert card["data"]["train_csv_sha256"] == run.data.tags["cleansweep.train_csv_sha256"]
    assert "selected/model.json" in {a.path for a in client.list_artifacts(run.info.run_id, "selected")}
    return card


@pytest.mark.integration
def test_two_workers_gloo_one_value_per_evaluation(local_ray, tiny_world, tmp_path, capsys):
    workdir = tmp_path / "work"
    started = time.monotonic()
    argv = _pretrain_argv(tiny_world, workdir, "two", "--num-workers", "2", "--cpus-per-worker", "1",
                          "--epochs", "1", "--eval-every", "0.5")
    assert cli.main(argv) == 0, capsys.readouterr().err
    print(f"2-worker pre-training: {time.monotonic() - started:.1f} s")
    client, run = _run_of(workdir, "two")
    rows = tiny_world["n_train"]
    _check_one_value_per_evaluation(client, run, _eval_steps(rows, 16, 1, 0.5))
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["cleansweep.kind"] == "pretrain" and tags["cleansweep.objective"] == "mmcl"
    assert tags["cleansweep.attack"] == "badnet" and len(tags["cleansweep.worker_nodes"].split(",")) == 2
    assert params["world_size"] == "2" and params["per_rank_batch_size"] == "8" and params["ray.num_workers"] == "2"
    _check_selected(workdir, "two", client, run)
    assert "selected checkpoint:" in capsys.readouterr().out


@pytest.mark.integration
def test_impossible_resources_on_a_real_cluster(local_ray, tiny_world, tmp_path, capsys):
    argv = _pretrain_argv(tiny_world, tmp_path / "w", "big", "--num-workers", "64")
    err = _one_line_error(capsys, argv)
    assert "--num-workers 64" in err and "2 CPUs" in err
    assert not (tmp_path / "w").exists()  # nothing written for a run that could never start
    err = _one_line_error(capsys, _pretrain_argv(tiny_world, tmp_path / "w", "gpu", "--num-workers", "1",
                                                 "--use-gpu"))
    assert "--use-gpu" in err and "0 GPUs" in err


def _kill_after_checkpoint(cmd: list[str], env: dict, run_dir: Path, min_step: int, timeout: float = 300) -> int:
    """Run the CLI in its own process group; SIGKILL it once a checkpoint with step >= min_step lands."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = [int(p.name.rsplit("_", 1)[1]) for p in run_dir.glob(f"{layout.CHECKPOINT_PREFIX}*")
                    if p.is_dir() and not p.name.startswith(".")]
            if max(done, default=-1) >= min_step:
                time.sleep(2.0)  # let Ray record the checkpoint it just wrote before the kill
                return max(done)
            if proc.poll() is not None:
                pytest.fail(f"run ended before the kill: {proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.2)
        pytest.fail("no checkpoint before the timeout")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return -1


def _check_resumed(workdir: Path, name: str, killed_at: int, expected: list[int]) -> None:
    client, run = _run_of(workdir, name)
    assert run.info.status == "FINISHED"
    _check_one_value_per_evaluation(client, run, expected)
    resumed_from = run.data.params["resumed_from.v2"]  # the second process started from a checkpoint...
    # ...the newest one Ray had recorded: Train V2 resumes from its checkpoint manager's snapshot, which the controller
    # writes after it registers a reported checkpoint (ray/train/v2/_internal/execution/checkpoint/
    # checkpoint_manager.py); on a loaded machine that can lag the folder we saw on disk, so at most one evaluation
    # interval is redone.
    assert int(resumed_from.rstrip("/").rsplit("_", 1)[1]) >= killed_at - 1 >= 0
    _check_selected(workdir, name, client, run)


@pytest.mark.integration
def test_resume_after_kill_in_process_worker(ray_home, tiny_world, tmp_path):
    workdir = tmp_path / "work"
    # 8 epochs (32 steps): long enough that the run is still going 2 s after its first checkpoint on a fast machine.
    argv = _pretrain_argv(tiny_world, workdir, "killed", "--num-workers", "0", "--epochs", "8", "--eval-every", "0.25")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_at = _kill_after_checkpoint([sys.executable, "-m", "cleansweep", *argv], env,
                                       workdir / "pretrain" / "killed", min_step=1)
    # What a kill in the middle of writing a checkpoint leaves (this kill may have left a real one beside it).
    leftover = Path(tempfile.gettempdir()) / scratch.name(workdir / "pretrain" / "killed") / "rank0" / "ckpt-x"
    leftover.mkdir(parents=True, exist_ok=True)
    assert cli.main([*argv, "--resume"]) == 0
    assert not leftover.parent.parent.exists()  # cleared by the resumed worker and the run's end
    _check_resumed(workdir, "killed", killed_at, _eval_steps(tiny_world["n_train"], 16, 8, 0.25))


class _Cluster:
    """A real two-node Ray cluster on this machine (`ray start --block`), torn down by process group."""

    def __init__(self, env: dict, log_dir: Path):
        self.env, self.log_dir, self.procs = env, log_dir, []
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Own temp dirs (short: Ray's socket paths must fit 107 bytes), so /tmp/ray/ray_current_cluster, which a
        # plain ray.init() elsewhere on this machine would follow, never points at this cluster.
        self.temp = Path(tempfile.mkdtemp(prefix="csray-", dir="/tmp"))

    def _alive_nodes(self) -> int:
        code = f"import ray; ray.init(address={self.address!r}); print(sum(x['Alive'] for x in ray.nodes()))"
        try:
            got = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                 timeout=180)
        except subprocess.TimeoutExpired:
            return -1
        lines = got.stdout.strip().splitlines()
        return int(lines[-1]) if got.returncode == 0 and lines and lines[-1].isdigit() else -1

    def start_node(self, args: list[str], log: str, nodes: int, attempts: int = 3) -> None:
        """Start one node and wait until the cluster has `nodes` alive nodes; on a loaded machine a node can miss
        Ray's fixed 30 s startup window and exit, so it is started again (up to `attempts` times)."""
        for attempt in range(attempts):
            out = open(self.log_dir / f"{attempt}-{log}", "w")
            proc = subprocess.Popen([RAY, "start", "--block", *args], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if self._alive_nodes() >= nodes:
                    return
                time.sleep(2)
            self._stop(proc)
        raise AssertionError(f"{log}: node did not join after {attempts} attempts; see {self.log_dir}")

    def __enter__(self) -> _Cluster:
        self.start_node(["--head", "--port", str(self.port), "--num-cpus", "1", "--include-dashboard", "false",
                         "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp / "h")], "head.log", nodes=1)
        self.start_node(["--address", self.address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                         "--temp-dir", str(self.temp / "w")], "worker.log", nodes=2)
        return self

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        # The equivalent of `ray stop` for one node we started: other Ray clusters on this machine stay up.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        try:  # children a node left behind when its leader went on SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            self._stop(proc)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.mark.integration
def test_two_node_cluster_spread_kill_and_resume(ray_home, tiny_world, tmp_path):
    started = time.monotonic()
    workdir = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token"}  # `ray start` + driver: token auth on
    with _Cluster(env, tmp_path) as cluster:
        argv = _pretrain_argv(tiny_world, workdir, "spread", "--num-workers", "2", "--cpus-per-worker", "1",
                              "--address", cluster.address, "--epochs", "2", "--eval-every", "0.25")
        killed_at = _kill_after_checkpoint([sys.executable, "-m", "cleansweep", *argv], env,
                                           workdir / "pretrain" / "spread", min_step=1)
        resumed = subprocess.run([sys.executable, "-m", "cleansweep", *argv, "--resume"], env=env,
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        # `ray job submit` and KubeRay RayJobs pass the cluster as RAY_ADDRESS, not --address: a sweep started so
        # must run its trials on that cluster (it used to start a private one-node Ray).
        space = tmp_path / "on-cluster.yaml"
        space.write_text(textwrap.dedent(f"""
            model: {{checkpoint: {workdir / 'pretrain' / 'spread' / 'selected' / 'model.safetensors'}}}
            data: {{train_csv: {tiny_world['clean_csv']}, eval_dir: {tiny_world['eval_dir']}, batch_size: 16}}
            epochs: 1
            space: {{optim.lr: {{choice: [0.001]}}}}
            search: {{num_samples: 1, max_concurrent: 1}}
            scheduler: {{name: none}}
            """))
        swept = subprocess.run([sys.executable, "-m", "cleansweep", "search", str(space), "--name", "on-cluster",
                                "--workdir", str(workdir)], env={**env, "RAY_ADDRESS": cluster.address},
                               capture_output=True, text=True, timeout=600)
        assert swept.returncode == 0, swept.stderr[-3000:]
    print(f"two-node cluster test: {time.monotonic() - started:.1f} s")
    _check_resumed(workdir, "spread", killed_at, _eval_steps(tiny_world["n_train"], 16, 2, 0.25))
    client, run = _run_of(workdir, "spread")
    nodes = run.data.tags["cleansweep.worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1]  # one worker per node
    assert run.data.tags["cleansweep.num_nodes"] == "2"
    trials = client.search_runs([client.get_experiment_by_name("cleansweep").experiment_id],
                                "tags.`cleansweep.sweep` = 'on-cluster' and tags.`cleansweep.kind` = 'trial'")
    assert len(trials) == 1 and trials[0].data.tags["cleansweep.node"] in nodes  # a node of the `ray start` cluster
