"""Proxy ASR vs true ASR: can a defender who does not know the trigger still select a clean model?

A sweep with `objective: {asr: proxy}` scans its starting model (`cleansweep scan`, DECREE-style inversion), then
constrains every trial on the proxy ASR (share of non-target images the inverted trigger sends to the suspected
target) while the known trigger's ASR is logged beside it. Over every evaluation of the sweep this prints, side by
side from one run:

- the rank correlation (Spearman) of proxy vs true ASR;
- proxy-only selection: the most accurate evaluation with proxy ASR <= 5%, its true ASR and top-1, against the
  true best (the most accurate evaluation with true ASR <= 5%): does the proxy pick a model with true ASR <= 5%
  within 2 points of top-1 of the true best?

Sweeps: `demo` (search_spaces/demo.yaml on the demo's MMCL model) and `toy` (the toy study's CleanCLIP space on the
demo's MMCL+SSL model, the harder one).

    python benchmarks/proxy_asr.py --workdir /tmp/proxy            # both, ~20-30 min on 2 cores
    python benchmarks/proxy_asr.py --workdir /tmp/proxy --sweeps demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from cleansweep import tracking
from cleansweep.config import validate
from cleansweep.objective import ASR, PROXY_ASR, TOP1
from cleansweep.results import analysis
from cleansweep.sweep import driver
from cleansweep.sweep import start as start_model
from cleansweep.sweep.config import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.05


def sweep_config(kind: str, samples: int | None) -> SearchConfig:
    """demo.yaml, or the toy study's space on the MMCL+SSL demo model, both constrained on the proxy ASR."""
    from cleansweep.experiments.study import _TOY_CLEAN

    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    if kind == "toy":
        raw = {**raw, **_TOY_CLEAN, "model": {"preset": "demo", "objective": "mmcl+ssl"}}
    raw["objective"] = {"asr": "proxy", "threshold": THRESHOLD}
    if samples:
        raw["search"] = {**raw["search"], "num_samples": samples}
    return validate(SearchConfig, raw, f"proxy benchmark {kind}")


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Rank correlation: the Pearson correlation of the ranks (ties averaged)."""
    return float(a.rank().corr(b.rank()))


def selection(evals: pd.DataFrame) -> dict[str, float | str | None]:
    """Proxy-only selection against the true best, from every evaluation (columns TOP1, ASR, PROXY_ASR)."""
    by_proxy = analysis.best_feasible(evals.rename(columns={ASR: "true", PROXY_ASR: ASR}), THRESHOLD)
    by_true = analysis.best_feasible(evals, THRESHOLD)
    out: dict[str, float | str | None] = {"true_best_top1": None if by_true is None else float(by_true[TOP1])}
    if by_proxy is not None:
        out.update(proxy_pick_top1=float(by_proxy[TOP1]), proxy_pick_true_asr=float(by_proxy["true"]),
                   proxy_pick_proxy_asr=float(by_proxy[ASR]), proxy_pick_trial=str(by_proxy["trial_id"]))
        if by_true is not None:
            out["gap_points"] = 100 * (float(by_true[TOP1]) - float(by_proxy[TOP1]))
            out["pick_is_clean_and_within_2_points"] = bool(by_proxy["true"] <= THRESHOLD and
                                                            out["gap_points"] <= 2.0)
    return out


def measure(kind: str, workdir: Path, samples: int | None) -> dict:
    cfg = sweep_config(kind, samples)
    name = f"proxy-{kind}-{int(time.time())}"
    t0 = time.monotonic()
    start = start_model.resolve(cfg, workdir)
    out = driver.search(cfg, start, name=name, workdir=workdir, echo=lambda s: None)
    record = tracking.load_sweep(name, out["tracking_uri"])
    trials, history = analysis.main_stage(record)
    evals = analysis.evaluations(history, trials).dropna(subset=[PROXY_ASR])
    scan = json.loads((Path(start.base["proxy"]).parent / "scan.json").read_text())["model"]
    return {"sweep": kind, "name": name, "minutes": round((time.monotonic() - t0) / 60, 1),
            "evaluations": len(evals), "trials": int(evals["trial_id"].nunique()),
            "start_true_asr": start.metrics[ASR], "start_proxy_asr": start.metrics.get(PROXY_ASR),
            "suspected_target": scan["suspected_target"], "pl1_norm": scan["pl1_norm"],
            "spearman_proxy_vs_true": spearman(evals[PROXY_ASR], evals[ASR]), **selection(evals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--sweeps", default="demo,toy")
    ap.add_argument("--num-samples", type=int, default=None, help="trials per sweep (default: the space's)")
    args = ap.parse_args()
    rows = [measure(kind, args.workdir.resolve(), args.num_samples) for kind in args.sweeps.split(",")]
    print(pd.DataFrame(rows).T.to_string(header=False))
    print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
