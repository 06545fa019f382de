"""benchmarks/gpu_check.sh: its refusal without a GPU and its nvidia-smi summary (fast); its CPU dry run, which
goes through the same steps (P1, a Ray sweep, evaluation throughput) with tiny counts (integration: starts Ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "CLEANSWEEP_GPU"))}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env={**clean, "HOME": str(home), "PYTHON": sys.executable,
                               "PYTHONPATH": str(ROOT), **env})


def _gpu_visible() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"],
                                                                      capture_output=True).returncode == 0


@pytest.mark.skipif(_gpu_visible(), reason="a GPU is visible here")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    out = _run([str(tmp_path / "w")], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("gpu_check: no GPU visible")
    assert "CLEANSWEEP_GPU_CHECK_CPU=1" in out.stderr


def test_utilisation_summary_of_nvidia_smi_csv(tmp_path):
    samples = tmp_path / "s.csv"
    samples.write_text("utilization.gpu [%], memory.used [MiB]\n10 %, 1000 MiB\n40 %, 3000 MiB\n100 %, 2500 MiB\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "util", str(samples)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == ("GPU utilisation during the sweep: mean 50.0% max 100%, memory max 3000 MiB "
                                  "(3 samples, 1 s apart)")


@pytest.mark.integration
def test_cpu_dry_run_reports_every_step(tmp_path):
    out = _run(["--dry-run", str(tmp_path / "w")], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("P1 ")] == ["P1 tiny-rn", "P1 tiny-vit"]
    sweep = [line for line in lines if line.startswith("SWEEP ")]
    assert len(sweep) == 1 and "2 of 2 trials FINISHED" in sweep[0] and "exit 0" in sweep[0]
    assert "GPU utilisation: not sampled (CPU dry run)" in lines
    evals = [line for line in lines if line.startswith("EVAL tiny-rn amp=")]
    assert len(evals) == 2 and all("images/s over 16 images" in line for line in evals)
    assert lines[-1] == "gpu_check: done"
