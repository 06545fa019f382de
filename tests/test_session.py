"""session.fit on the tiny world: reports, effective params, init checkpoints, resume, every method end to end."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from method_examples import shipped_example

from cleansweep import fit as session
from cleansweep.config import deep_update
from cleansweep.errors import UserError
from cleansweep.methods import list_methods
from cleansweep.models import file_sha256, load_state_dict_file
from cleansweep.train_config import TrainSpec


class Recorder:
    """A report adapter that keeps every metrics dict and copies the checkpoints of chosen steps."""

    def __init__(self, keep_dir: Path | None = None, keep_steps: tuple[int, ...] = ()) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.files: list[list[str]] = []
        self.keep_dir, self.keep_steps = keep_dir, keep_steps

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.metrics.append(metrics)
        self.files.append(sorted(p.name for p in Path(checkpoint_dir).iterdir()) if checkpoint_dir else [])
        if self.keep_dir is not None and metrics["step"] in self.keep_steps:
            shutil.copytree(checkpoint_dir, self.keep_dir / f"step{metrics['step']}")

    @property
    def steps(self) -> list[int]:
        return [m["step"] for m in self.metrics]


def test_fit_reports_effective_params_and_checkpoints(tiny_spec: dict, tiny_world: dict) -> None:
    rec = Recorder()
    summary = session.fit(tiny_spec, rec)
    assert rec.steps == [0, 4]  # 64 rows / batch 16 = 4 steps; evaluation at the start and after the epoch
    params = rec.metrics[0]["params"]
    assert "params" not in rec.metrics[1]
    assert params["steps_per_epoch"] == 4 and params["world_size"] == 1 and params["device"] == "cpu"
    assert params["optim.lr"] == 1e-3 and params["effective.weight_decay"] == 0.1 and params["init_sha256"] is None
    assert params["num_params"] > 1_000_000
    assert rec.files[0] == ["loop.json", "model.json", "model.safetensors", "state.pt"]
    last = rec.metrics[-1]
    for key in ("zeroshot_top1", "zeroshot_top5", "asr_top1", "loss", "mmcl_loss", "lr", "epoch", "feasible",
                "best_feasible_top1", "best_feasible_step"):
        assert key in last
    assert last["epoch"] == 1.0 and last["num_images"] == 36 and 0 <= last["zeroshot_top1"] <= 1
    assert summary["step"] == 4 and summary["last"] == last


def test_fit_checkpoint_policies(tiny_spec: dict) -> None:
    none = Recorder()
    session.fit(tiny_spec, none, checkpoints="none")
    assert none.steps == [0, 4] and none.files == [[], []]
    needed = Recorder()
    session.fit({**tiny_spec, "asr_threshold": 1.0}, needed, checkpoints="needed")  # every evaluation feasible
    top1 = [m["zeroshot_top1"] for m in needed.metrics]
    # Step 0 is the best feasible so far; the final step only if it beats it (a finished run never resumes).
    assert [bool(f) for f in needed.files] == [True, top1[1] > top1[0]]


def test_final_checkpoint_keeps_weights_only_and_resumes_to_the_end(tiny_spec: dict, tmp_path: Path) -> None:
    rec = Recorder(tmp_path, keep_steps=(0, 4))
    session.fit(tiny_spec, rec)
    assert rec.files == [["loop.json", "model.json", "model.safetensors", session.STATE_FILE],
                         ["loop.json", "model.json", "model.safetensors"]]  # step 4 is the last: nothing resumes
    again = Recorder()
    summary = session.fit(tiny_spec, again, resume_from=tmp_path / "step4")
    assert again.steps == [] and summary["step"] == 4  # a driver killed after the last report resumes to the end
    (tmp_path / "step0" / session.STATE_FILE).unlink()
    with pytest.raises(UserError, match="no state.pt"):
        session.fit(tiny_spec, Recorder(), resume_from=tmp_path / "step0")


def test_fit_starts_from_an_init_checkpoint(tiny_spec: dict, tmp_path: Path) -> None:
    first = Recorder(tmp_path, keep_steps=(4,))
    session.fit(tiny_spec, first)
    weights = tmp_path / "step4" / session.MODEL_FILE
    rec = Recorder()
    spec = deep_update(tiny_spec, {"model.init": str(weights), "epochs": 0})
    session.fit(spec, rec)
    assert rec.metrics[0]["params"]["init_sha256"] == file_sha256(weights)
    # The starting model *is* the checkpoint: its evaluation repeats the first run's final evaluation.
    for key in ("zeroshot_top1", "zeroshot_top5", "asr_top1"):
        assert rec.metrics[0][key] == first.metrics[-1][key]


def test_resume_matches_an_uninterrupted_run(tiny_spec: dict, tmp_path: Path) -> None:
    # MMCL+SSL: resuming mid-epoch must also reproduce the augmented views.
    spec = deep_update(tiny_spec, {"epochs": 2, "eval_every": 0.5, "method.ssl_weight": 1.0})
    full = Recorder(tmp_path, keep_steps=(2, 8))
    session.fit(spec, full)
    assert full.steps == [0, 2, 4, 6, 8]
    resumed = Recorder(tmp_path / "resumed", keep_steps=(8,))
    (tmp_path / "resumed").mkdir()
    summary = session.fit(spec, resumed, resume_from=str(tmp_path / "step2"))
    assert resumed.steps == [4, 6, 8]  # never re-reports step 2
    assert resumed.metrics[0]["params"]["resumed_from"].endswith("step2")
    a = load_state_dict_file(tmp_path / "step8" / session.MODEL_FILE)
    b = load_state_dict_file(tmp_path / "resumed" / "step8" / session.MODEL_FILE)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for x, y in zip(full.metrics[2:], resumed.metrics, strict=True):
        assert x["loss"] == y["loss"] and x["ssl_loss"] == y["ssl_loss"] and x["zeroshot_top1"] == y["zeroshot_top1"]
    assert summary["best_feasible_top1"] == full.metrics[-1]["best_feasible_top1"]


def test_resume_from_the_starting_evaluation_never_re_reports_step_0(tiny_spec: dict, tmp_path: Path) -> None:
    # A driver killed right after the step-0 checkpoint resumes from it: re-reporting step 0 would hand Ray Train a
    # second checkpoint under the same directory name (pruning one deletes the other's files).
    first = Recorder(tmp_path, keep_steps=(0,))
    session.fit(deep_update(tiny_spec, {"eval_every": 0.5}), first)
    rec = Recorder()
    session.fit(deep_update(tiny_spec, {"eval_every": 0.5}), rec, resume_from=str(tmp_path / "step0"))
    assert first.steps == [0, 2, 4] and rec.steps == [2, 4]


def test_resume_applies_the_specs_weight_decay(tiny_spec: dict, tmp_path: Path) -> None:
    first = Recorder(tmp_path, keep_steps=(2,))
    session.fit(deep_update(tiny_spec, {"eval_every": 0.5, "optim.weight_decay": 0.1}), first)
    saved = torch.load(tmp_path / "step2" / session.STATE_FILE, weights_only=True)["optimizer"]
    assert {g["weight_decay"] for g in saved["param_groups"]} == {0.0, 0.1}
    rec = Recorder()
    spec = deep_update(tiny_spec, {"eval_every": 0.5, "optim.weight_decay": 7.5, "optim.beta2": 0.95})
    session.fit(spec, rec, resume_from=str(tmp_path / "step2"))
    params = rec.metrics[0]["params"]
    assert params["effective.weight_decay"] == 7.5 and params["effective.betas"] == [0.9, 0.95]


def test_weight_decay_really_shrinks_the_weights(tiny_spec: dict, tmp_path: Path) -> None:
    # Heavy regularization is contrastive + weight decay: with lr 1e-3 and decay 100, AdamW multiplies each decayed
    # weight by (1 - lr_t * 100) every step, on top of the (identical-size) Adam update.
    norms = {}
    for wd in (0.0, 100.0):
        rec = Recorder(tmp_path / f"wd{wd}", keep_steps=(4,))
        (tmp_path / f"wd{wd}").mkdir()
        session.fit(deep_update(tiny_spec, {"optim.weight_decay": wd, "optim.warmup_steps": 0,
                                            "optim.schedule": "constant"}), rec)
        sd = load_state_dict_file(tmp_path / f"wd{wd}" / "step4" / session.MODEL_FILE)
        norms[wd] = sd["visual.layer1.0.conv1.weight"].norm().item(), sd["logit_scale"].item()
    ratio = norms[100.0][0] / norms[0.0][0]
    assert ratio == pytest.approx((1 - 1e-3 * 100) ** 4, abs=0.05)  # 0.656
    assert norms[100.0][1] == pytest.approx(norms[0.0][1], abs=0.01)  # logit_scale is not decayed


@pytest.mark.filterwarnings("ignore:deep_cluster. num_clusters")  # k capped: test_deep_cluster_k_is_capped_...
@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_through_fit(name: str, tiny_spec: dict) -> None:
    # The method as its shipped search space runs it (k-means' k capped at the 64 rows, as fit does).
    example = shipped_example(name).for_rows(64)
    rec = Recorder()
    spec = deep_update(tiny_spec, {"method": example.model_dump(mode="json"), "optim.lr": 1e-4})
    session.fit(spec, rec)
    assert rec.steps == [0, 4]
    last = rec.metrics[-1]
    weighted = [f.removesuffix("_weight") + "_loss" for f, v in example.model_dump().items()
                if f.endswith("_weight") and v > 0]
    assert weighted and all(part in last for part in weighted) and torch.isfinite(torch.tensor(last["loss"]))
    # The effective params carry this method's fields only, with the values it ran with.
    params = rec.metrics[0]["params"]
    assert {k: v for k, v in params.items() if k.startswith("method.")} == {
        f"method.{k}": v for k, v in example.model_dump(mode="json").items()}


def test_deep_cluster_k_is_capped_at_the_rows_and_logged(tiny_spec: dict) -> None:
    rec = Recorder()
    spec = deep_update(tiny_spec, {"method": {"name": "deep_cluster", "cluster_weight": 1.0, "num_clusters": 1000},
                                   "epochs": 0})
    with pytest.warns(UserWarning, match="num_clusters 1000 > 64 rows"):
        session.fit(spec, rec)
    assert rec.metrics[0]["params"]["method.num_clusters"] == 64


def test_a_field_of_another_method_is_refused(tiny_spec: dict) -> None:
    # It used to be accepted and ignored: a par_cap under contrastive changed nothing and said nothing.
    spec = deep_update(tiny_spec, {"method": {"name": "contrastive", "par_cap": 0.3}})
    with pytest.raises(UserError, match=r"^train spec: method: par_cap: not a field of method 'contrastive' "
                                        r"\(a field of perturb_recover\); contrastive takes name, mmcl_weight"):
        session.fit(spec, Recorder())
    with pytest.raises(UserError, match=r"^train spec: method: unknown method 'x'; choose from: contrastive"):
        session.preflight(deep_update(tiny_spec, {"method.name": "x"}))


def test_bad_inputs_are_user_errors(tiny_spec: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        session.fit(deep_update(tiny_spec, {"data.train_csv": str(tmp_path / "missing.csv")}), Recorder())
    with pytest.raises(UserError, match="not a cleansweep checkpoint"):
        session.fit(tiny_spec, Recorder(), resume_from=str(tmp_path))
    with pytest.raises(UserError, match="fewer than one batch"):
        session.fit(deep_update(tiny_spec, {"data.batch_size": 128}), Recorder())
    with pytest.raises(UserError, match="lr"):
        session.fit(deep_update(tiny_spec, {"optim.lr": -1}), Recorder())
    assert isinstance(session.validate(TrainSpec, tiny_spec, "spec"), TrainSpec)
