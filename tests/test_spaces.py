"""Search-space YAML: every shipped file loads and converts, the paper's grids have the paper's counts and values,
and every kind of mistake is one line naming the key (cli.main returns 2)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cleansweep import cli
from cleansweep.errors import UserError
from cleansweep.sweep import space as spaces
from cleansweep.sweep.config import Domain
from cleansweep.train_config import TrainSpec

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

# Appendix D of the paper: configurations per grid (D.13: 17 x 15 perturbed models, then 9 learning rates).
PAPER_COUNTS = {1: 13, 2: 13, 3: 12, 4: 23, 5: 69, 6: 85, 7: 44, 8: 71, 9: 8, 10: 19, 11: 9 * 8, 12: 8 * 9, 13: 9,
                14: 14, 15: 2 * 13, 16: 4 * 4}

# Typed from the paper (Appendix D.10 and D.1), independently of the YAML files.
D10_LR = [1e-8, 5e-8, 1e-7, 3e-7, 5e-7, 7e-7, 1e-6, 3e-6, 5e-6, 7e-6, 1e-5, 3e-5, 5e-5, 1e-4, 3e-4, 5e-4, 7e-4,
          1e-4, 3e-4]
D1_LR = [1e-5, 4e-5, 8e-5, 1e-4, 1.5e-4, 2e-4, 2.5e-4, 3e-4, 3.5e-4, 4e-4, 8e-4, 1e-3, 4e-3]
D13_SHRINK = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.92, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 1]
D13_PERTURB = [1e-5, 1e-4, 1e-3, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.4, 0.8, 1, 2, 3, 4]


def all_space_files() -> list[Path]:
    return sorted(SPACES.glob("*.yaml"))


def test_every_paper_file_is_shipped():
    names = {p.name for p in all_space_files()}
    assert {f"paper_D{i:02d}.yaml" for i in range(1, 17)} <= names


@pytest.mark.parametrize("entry", sorted(PAPER_COUNTS))
def test_paper_grid_counts(entry):
    path = SPACES / f"paper_D{entry:02d}.yaml"
    cfg = spaces.load(path)
    points = spaces.grid_points(cfg)
    assert len(points) == PAPER_COUNTS[entry]
    assert spaces.count_trials(cfg)["main"] == PAPER_COUNTS[entry]
    text = path.read_text()
    assert f"Appendix D.{entry}" in text.splitlines()[0]  # the comment names the entry
    assert f"Appendix D.{entry}:" in cfg.description and "Model:" in cfg.description


@pytest.mark.parametrize("entry", sorted(PAPER_COUNTS))
def test_models_poisoned_by_finetuning_openai_clip_are_quickgelu(entry):
    # D.5/D.6 finetune OpenAI's CLIP (QuickGELU); RN50 has the same keys and would load with GELU, silently.
    expected = "RN50-quickgelu" if entry in (5, 6) else "RN50"
    assert spaces.load(SPACES / f"paper_D{entry:02d}.yaml").model.name == expected


def test_paper_values_exact_with_duplicates():
    d10 = [p["optim.lr"] for p in spaces.grid_points(spaces.load(SPACES / "paper_D10.yaml"))]
    assert d10 == D10_LR  # order and the duplicated 1e-4, 3e-4 kept
    d1 = [p["optim.lr"] for p in spaces.grid_points(spaces.load(SPACES / "paper_D01.yaml"))]
    assert d1 == D1_LR
    d6 = [p["optim.lr"] for p in spaces.grid_points(spaces.load(SPACES / "paper_D06.yaml"))]
    twice = [5e-05, 4.5e-05, 4e-05, 3.5e-05, 3e-05, 2.5e-05, 2e-05, 1.5e-05, 1.4e-05, 1.3e-05, 1.2e-05, 1.1e-05,
             1e-05, 9e-06, 8e-06, 7e-06, 6e-06, 5e-06, 1e-06, 5e-07, 1e-07, 5e-08, 1e-08]  # D.6 lists these twice
    assert len(d6) == 85 and len(set(d6)) == 85 - len(twice)
    assert all(d6.count(v) == 2 for v in twice)


def test_paper_d13_two_stage():
    cfg = spaces.load(SPACES / "paper_D13.yaml")
    pre = spaces.preselect_points(cfg)
    assert len(pre) == 17 * 15
    assert sorted({p["method.shrink"] for p in pre}) == sorted(D13_SHRINK)
    assert sorted({p["method.perturb"] for p in pre}) == sorted(D13_PERTURB)
    assert all(p["epochs"] == 0 and p["method.name"] == "shrink_perturb" for p in pre)
    spec = spaces.trial_spec(spaces.base_train_dict(cfg), pre[-1])
    assert spec.epochs == 0 and spec.method.shrink == 1 and spec.method.perturb == 4
    assert spaces.count_trials(cfg) == {"preselect": 255, "main": 9}


def test_paper_d12_l2_weight_is_weight_decay_and_d11_clusters():
    cfg = spaces.load(SPACES / "paper_D12.yaml")
    wds = sorted({p["optim.weight_decay"] for p in spaces.grid_points(cfg)})
    assert wds == [0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
    cfg = spaces.load(SPACES / "paper_D11.yaml")
    spec = spaces.trial_spec(spaces.base_train_dict(cfg), spaces.grid_points(cfg)[-1])
    assert spec.method.name == "deep_cluster" and spec.method.cluster_weight == 50 and spec.optim.lr == 1e-3


@pytest.mark.parametrize("path", all_space_files(), ids=lambda p: p.name)
def test_every_space_file_loads_and_converts(path):
    import optuna

    from cleansweep.sweep.space import DefineByRun

    cfg = spaces.load(path)
    base = spaces.base_train_dict(cfg)
    if cfg.search.algorithm == "grid":
        points = spaces.grid_points(cfg)
        assert points
        specs = [spaces.trial_spec(base, p) for p in (points[0], points[-1])]
    else:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        space = DefineByRun(spaces.variants(cfg))
        specs = []
        for _ in range(6):
            trial = study.ask()
            fixed = space(trial)
            specs.append(spaces.trial_spec(base, {**trial.params, **fixed}))
            study.tell(trial, 0.0)
    assert all(isinstance(s, TrainSpec) and s.epochs == cfg.epochs for s in specs if "epochs" not in cfg.space)


def test_expand_grid_keeps_order_and_duplicates():
    params = {"optim.lr": Domain(grid=[3, 1, 3]), "method.ssl_weight": Domain(grid=[1, 2]), "epochs": 4}
    points = spaces.expand_grid(params)
    assert [(p["optim.lr"], p["method.ssl_weight"]) for p in points] == [(3, 1), (3, 2), (1, 1), (1, 2), (3, 1),
                                                                           (3, 2)]
    assert all(p["epochs"] == 4 for p in points)


def test_method_conditional_variants(tmp_path):
    path = write(tmp_path, """
        model: {preset: demo}
        search: {algorithm: grid}
        space: {optim.lr: {grid: [1e-3, 2e-3]}}
        methods:
          cleanclip: {method.name: contrastive, method.ssl_weight: 1}
          shrink_perturb: {method.shrink: {grid: [0.5, 0.9, 1.0]}}
        """)
    cfg = spaces.load(path)
    points = spaces.grid_points(cfg)
    assert len(points) == 2 + 2 * 3
    sp = [p for p in points if p["variant"] == "shrink_perturb"]
    assert all(p["method.name"] == "shrink_perturb" and "method.ssl_weight" not in p for p in sp)
    spec = spaces.trial_spec(spaces.base_train_dict(cfg), points[0])
    assert spec.method.name == "contrastive" and spec.method.ssl_weight == 1 and spec.optim.lr == 1e-3


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
model: {preset: demo}
space:
  optim.lr: {loguniform: [1e-4, 3e-3]}
"""

BAD = {
    "uniform_reversed": ("space: {optim.lr: {uniform: [1, 0]}}", "optim.lr"),
    "uniform_equal": ("space: {optim.lr: {uniform: [0.1, 0.1]}}", "optim.lr"),
    "loguniform_zero": ("space: {optim.lr: {loguniform: [0, 1e-3]}}", "optim.lr"),
    "unknown_domain": ("space: {optim.lr: {unifrom: [1e-4, 1e-3]}}", "unifrom"),
    "unknown_top_key": ("serach: {algorithm: grid}", "serach"),
    "unknown_dotted_key": ("space: {optim.lrr: {loguniform: [1e-4, 1e-3]}}", "optim.lrr"),
    "section_as_key": ("space: {optim: {loguniform: [1e-4, 1e-3]}}", "optim"),
    "grid_with_optuna": ("space: {optim.lr: {grid: [1e-4, 1e-3]}}", "optim.lr"),
    "choice_with_grid_algo": ("search: {algorithm: grid}\nspace: {optim.lr: {choice: [1e-4]}}", "optim.lr"),
    "bad_value": ("space: {optim.lr: {choice: [1e-3, -1]}}", "optim.lr"),
    "bad_method_params": ("methods: {cleanclip: [1, 2]}", "cleanclip"),
    "bad_scheduler": ("scheduler: {name: hyperband}", "scheduler.name"),
    "threshold_range": ("objective: {threshold: 5}", "objective.threshold"),
    "both_models": ("model: {preset: demo, checkpoint: x.safetensors}", "model"),
    "no_data": ("model: {checkpoint: x.safetensors}", "data"),
    "searched_data": ("space: {data.batch_size: {choice: [8, 16]}}", "data.batch_size"),
    "base_epochs": ("base: {epochs: 3}", "epochs"),
    "not_a_mapping": ("- 1\n- 2", "mapping"),
    "bad_yaml": ("space: {optim.lr: [", "invalid YAML"),
    # Bounds (issue 17): nothing infinite reaches a sampler, no seed numpy/Optuna refuse once Ray has started.
    "infinite_bound": ("space: {optim.lr: {loguniform: [1.0e-5, .inf]}}", "optim.lr"),
    "nan_choice": ("space: {method.ssl_weight: {choice: [1, .nan]}}", "method.ssl_weight"),
    # A field of another method (issue 18): refused at load time, naming the field and the method it was given to.
    "foreign_method_field": ("space: {method.par_cap: {uniform: [0.1, 1.0]}}",
                             "space.method.par_cap: not a field of method 'contrastive'"),
    "foreign_base_field": ("base: {method.num_clusters: 10}",
                           "method: num_clusters: not a field of method 'contrastive' (a field of deep_cluster)"),
    "foreign_variant_field": ("methods: {sp: {method.name: shrink_perturb, method.l2_init_weight: 1}}",
                              "methods.sp.method.l2_init_weight: not a field of method 'shrink_perturb'"),
    "method_section_as_key": ("space: {method: {choice: [1]}}", "space.method: name one field of the method"),
    "infinite_fixed": ("space: {optim.lr: .inf}", "optim.lr"),
    "negative_seed": ("seed: -1", "seed: Input should be greater than or equal to 0"),
    "seed_past_numpy": ("seed: 4294967296", "seed: Input should be less than or equal to 4294967295"),
    "infinite_budget": ("search: {time_budget_s: .inf}", "search.time_budget_s"),
    "negative_trigger_seed": ("attack: {trigger_seed: -1}", "attack.trigger_seed"),
    "eval_trigger_seed_past_numpy": ("attack: {seed: 4294967296}", "attack.seed"),
    "huge_patch": ("attack: {patch_size: 100000}", "attack.patch_size"),
    "zero_epochs": ("epochs: 0", "epochs: Input should be greater than or equal to 1"),
    "duplicate_key": ("epochs: 2\nepochs: 3", "line 3, column 1: duplicate key 'epochs', first given at line 2"),
    "nested_duplicate_key": ("search:\n  algorithm: grid\n  algorithm: optuna",
                             "line 4, column 3: duplicate key 'algorithm', first given at line 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_is_one_line_error(tmp_path, capsys, case):
    snippet, needle = BAD[case]
    model = "" if snippet.startswith("model:") or snippet.startswith("-") else "model: {preset: demo}\n"
    path = tmp_path / f"{case}.yaml"
    path.write_text(model + snippet + "\n")
    with pytest.raises(UserError) as err:
        spaces.load(path)
    assert "\n" not in str(err.value) and needle in str(err.value)
    assert cli.main(["search", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_good_space_and_numbers_written_like_the_paper(tmp_path):
    cfg = spaces.load(write(tmp_path, GOOD + "  method.ssl_weight: {choice: [1, 2e0]}\n"))
    dom = cfg.space["method.ssl_weight"]
    assert dom.choice == [1, 2.0] and isinstance(dom.choice[1], float)  # '2e0' is a number, not a string
    assert cfg.space["optim.lr"].loguniform == (1e-4, 3e-3)


def test_missing_file_is_user_error(tmp_path, capsys):
    assert cli.main(["search", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_method_names_the_key(tmp_path, capsys):
    path = write(tmp_path, """
        model: {preset: demo}
        space: {optim.lr: {loguniform: [1.0e-4, 1.0e-3]}}
        methods:
          cleanclip: {}
        """)
    with pytest.raises(UserError, match=r"methods.cleanclip.method.name: unknown method 'cleanclip'; choose from: "
                                        r"contrastive, deep_cluster"):
        spaces.load(path)  # the registry is the default: TrainSpec.method only takes registered methods
    with pytest.raises(UserError, match=r"methods.cleanclip.method.name: unknown method 'cleanclip'"):
        spaces.load(path, known_methods=["contrastive", "shrink_perturb"])
    assert cli.main(["search", str(path)]) == 2
    assert "unknown method 'cleanclip'" in capsys.readouterr().err


def test_a_missing_required_key_names_the_fix(tmp_path):
    (tmp_path / "empty.yaml").write_text("description: nothing else\n")
    with pytest.raises(UserError) as e:
        spaces.load(tmp_path / "empty.yaml")
    assert "model: required key missing; add it" in str(e.value) and "\n" not in str(e.value)


def test_a_huge_grid_is_refused_before_it_is_expanded(tmp_path, capsys):
    """Seven grids of ten values: 10^7 points took > 6 GB in the driver; refused counted, in well under a second."""
    import time
    import tracemalloc

    keys = ["optim.lr", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.warmup_steps",
            "method.ssl_weight"]
    values = {k: [i if k == "optim.warmup_steps" else 0.01 * (i + 1) for i in range(10)] for k in keys}
    lines = [f"  {k}: {{grid: {v}}}" for k, v in values.items()]
    path = tmp_path / "huge.yaml"
    path.write_text("model: {preset: demo}\nsearch: {algorithm: grid}\nspace:\n" + "\n".join(lines) + "\n")
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        spaces.load(path)
    seconds, (_, peak) = time.monotonic() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "10,000,000 trials" in str(err.value) and "search.max_grid_points (100,000)" in str(err.value)
    assert seconds < 5 and peak < 20 * 2**20, (seconds, peak)
    assert cli.main(["search", str(path), "--workdir", str(tmp_path / "work")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "work").exists()
    # The limit is a setting: raised in the YAML, the same grid is counted (still without expanding it).
    path.write_text(path.read_text().replace("{algorithm: grid}", "{algorithm: grid, max_grid_points: 10000000}"))
    assert spaces.count_trials(spaces.load(path)) == {"preselect": 0, "main": 10**7}


def test_grid_repeats_and_preselection_count_toward_the_limit(tmp_path):
    base = "model: {preset: demo}\nbase: {method.name: shrink_perturb}\n"
    repeats = write(tmp_path, base + "search: {algorithm: grid, num_samples: 4, max_grid_points: 30}\n"
                    "space: {optim.lr: {grid: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4, 5.0e-4, 6.0e-4, 7.0e-4, 8.0e-4]}}")
    with pytest.raises(UserError, match="makes 32 trials"):  # 8 points x 4 repeats
        spaces.load(repeats)
    pre = write(tmp_path, base + "search: {max_grid_points: 10}\nspace: {optim.lr: {loguniform: [1.0e-4, 1.0e-3]}}\n"
                "preselect:\n  space: {method.shrink: {grid: [0.1, 0.2, 0.3, 0.4]}, method.perturb: {grid: [0.1, 0.2, "
                "0.3]}}")
    with pytest.raises(UserError, match="preselect.space makes 12 trials"):
        spaces.load(pre)


def test_a_field_shared_by_every_variant_must_belong_to_each_method(tmp_path):
    # method.ssl_weight is every method's (ContrastiveWeights); method.shrink only shrink_perturb's.
    shared = """
        model: {preset: demo}
        space: {method.ssl_weight: {choice: [0.5, 1]}}
        methods:
          cleanclip: {method.name: contrastive}
          sp: {method.name: shrink_perturb, method.shrink: {uniform: [0.1, 1.0]}}
        """
    assert set(spaces.variants(spaces.load(write(tmp_path, shared)))) == {"cleanclip", "sp"}
    path = write(tmp_path, shared.replace("space: {method.ssl_weight", "space: {method.shrink"), "bad.yaml")
    with pytest.raises(UserError, match=r"methods.cleanclip.method.shrink: not a field of method 'contrastive' "
                                        r"\(searched with it\); choose from: method.name, method.mmcl_weight"):
        spaces.load(path)
    # A searched method name: the field must belong to every candidate method.
    either = write(tmp_path, """
        model: {preset: demo}
        space: {method.name: {choice: [contrastive, l2_init]}, method.l2_init_weight: {choice: [1, 2]}}
        """, "either.yaml")
    with pytest.raises(UserError, match=r"space.method.l2_init_weight: not a field of method 'contrastive'"):
        spaces.load(either)


def test_preselection_is_for_a_method_that_perturbs_the_start(tmp_path):
    path = write(tmp_path, """
        model: {preset: demo}
        base: {method.name: l2_init}
        search: {algorithm: grid}
        space: {optim.lr: {grid: [1.0e-4]}}
        preselect: {space: {method.l2_init_weight: {grid: [1, 2]}}}
        """)
    with pytest.raises(UserError, match=r"preselect: the two-stage option is for a method that perturbs the starting "
                                        r"weights \(shrink_perturb\); set base: \{method.name: shrink_perturb\}"):
        spaces.load(path)
    path.write_text(path.read_text().replace("l2_init_weight", "shrink").replace("name: l2_init", "name: "
                                                                                   "shrink_perturb"))
    points = spaces.preselect_points(spaces.load(path))
    assert [(p["method.name"], p["method.shrink"], p["epochs"]) for p in points] == [("shrink_perturb", 1, 0),
                                                                                      ("shrink_perturb", 2, 0)]
