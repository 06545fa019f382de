"""Trial workers of a local cluster start with glibc's malloc arenas capped (cleansweep.runtime.cluster.worker_env).

A real local Ray: the worker process's own environment (what glibc read when it started) carries the cap, the
driver's environment is left as it was, and a value the caller set wins.
"""

from __future__ import annotations

import os

import psutil
import pytest

from cleansweep.runtime import cluster


def _worker_environ() -> dict[str, str]:
    import ray

    @ray.remote
    def pid() -> int:
        return os.getpid()

    return psutil.Process(ray.get(pid.remote())).environ()  # the environment the process was started with


@pytest.mark.parametrize("preset", [None, "4"])
def test_local_workers_start_with_two_malloc_arenas(tmp_path, monkeypatch, preset):
    from ray._raylet import AuthenticationTokenLoader

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(var, raising=False)
    if preset is not None:
        monkeypatch.setenv("MALLOC_ARENA_MAX", preset)
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        with cluster.connect(None, echo=lambda line: None) as started:
            assert started
            worker = _worker_environ()
            during = os.environ.get("MALLOC_ARENA_MAX")
    finally:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        AuthenticationTokenLoader.instance().reset_cache()
    assert worker["MALLOC_ARENA_MAX"] == (preset or "2")
    assert during == preset  # the driver's own environment is restored once Ray has started


def test_worker_env_only_for_a_new_local_cluster(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    with cluster.worker_env(False):
        assert "MALLOC_ARENA_MAX" not in os.environ
    with cluster.worker_env(True):
        assert os.environ["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_ARENA_MAX" not in os.environ
