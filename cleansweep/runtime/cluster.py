"""Ray for every driver: one start-up rule and one resource pre-check (the SIGTERM shim: `interrupts`).

- `connect`: reuse an initialised Ray; else the explicit address (`--address`, `address:` in a YAML), else
  `RAY_ADDRESS` (what `ray job submit` and KubeRay RayJobs set), else a fresh local cluster (`"local"`: never
  whatever `ray start` cluster this machine's /tmp/ray happens to point at). Token auth stays on (Ray's default for
  local clusters): the dashboard runs code for whoever reaches it (ShadowRay, CVE-2023-48022).
- A fresh local cluster listens on loopback only (`loopback_node`): its node address is 127.0.0.1, so GCS, raylet,
  workers, the dashboard agent and all three Prometheus endpoints (dashboard head, autoscaler monitor, metrics
  agent: ray/dashboard/head.py, ray/autoscaler/_private/monitor.py, reporter_agent.py bind `get_localhost_ip()`
  when the node is on localhost) are unreachable from other machines; the token file is made private (0600).
- `check_resources`: fail fast when a request can never be placed: Tune only warns every 60 s and waits forever
  (`TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S` in ray/tune/execution/insufficient_resources_manager.py), and
  Train's controller retries forever (`FailureConfig.controller_failure_limit = -1` in ray/train/v2/api/config.py).
  Counts live nodes and, when an autoscaler reports its node groups, the nodes it may add (a KubeRay GPU group at 0
  replicas can still host GPU trials); an autoscaler that reports no node groups turns a refusal into a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cleansweep.errors import UserError

_EPS = 1e-6  # Ray resources have 1e-4 granularity; absorb float error in 1 / 0.1 etc.


# ------------------------------------------------------------------------------------------------ start-up
def ray_address(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    """The address `connect` uses: explicit, else $RAY_ADDRESS, else "local" (a new local cluster)."""
    env = os.environ if env is None else env
    return explicit or env.get("RAY_ADDRESS") or "local"


@contextlib.contextmanager
def connect(address: str | None, *, echo: Callable[[str], None] = print, worker_logs: bool = True) -> Iterator[bool]:
    """Ray for the block (see the module docstring for which); yields whether this call started it.

    Args:
        address: Explicit cluster address, or None.
        echo: Where the dashboard line goes.
        worker_logs: Forward workers' stdout to this process (pre-training progress); sweeps turn it off, Tune's
            table is their progress.
    """
    if ray.is_initialized():
        yield False
        return
    # Ray announces token auth on stderr at every start; the dashboard line below says it (one line per error).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    where = ray_address(address)
    with loopback_node(where == "local"), worker_env(where == "local"):
        ctx = ray.init(address=where, log_to_driver=worker_logs, configure_logging=False)
    private_token_file()
    url = getattr(ctx, "dashboard_url", None)
    if url:
        port = url.rsplit(":", 1)[-1]
        echo(f"Ray dashboard: http://{url} (token auth on: the page asks for the token; print it with "
             "`ray get-auth-token`, API clients send 'Authorization: Bearer <token>'; from another machine "
             f"tunnel it: ssh -L {port}:127.0.0.1:{port} HOST)")
    try:
        yield True
    finally:
        ray.shutdown()


@contextlib.contextmanager
def loopback_node(local: bool) -> Iterator[None]:
    """While a new local cluster starts, its node address is 127.0.0.1 instead of the host's network address.

    Ray 2.60 binds its gRPC servers and Prometheus endpoints to the node address (all interfaces for the gRPC ones
    unless that is loopback), and `ray.init(_node_ip_address="127.0.0.1")` is turned back into the host address
    (`services.resolve_ip_for_localhost`). Ray's own single-machine mode (Windows/macOS, `ray_constants.
    ENABLE_RAY_CLUSTER` False) keeps 127.0.0.1: the flag is read at call time, so it is lowered for the start only.
    A cluster other machines must join is started with `ray start`, never through here.
    """
    from ray._private import ray_constants  # private: pinned ray, the flag `services.get_node_ip_address` reads

    if not local:
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


# A trial worker (a Tune actor reused across trials) runs each trial in a new thread, and glibc gives threads their own
# malloc arenas (up to 8 per core) that keep freed memory: within ~50 tiny-rn trials a worker's RSS climbed from
# ~1.5 GB to ~2.5 GB, mostly 64 MB arena heaps (benchmarks/many_trials.py). Two arenas keep it flat (mallopt(3),
# M_ARENA_MAX); the process environment is where glibc reads it, before the first allocation.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


@contextlib.contextmanager
def worker_env(local: bool) -> Iterator[None]:
    """While a new local cluster starts, WORKER_ENV in the environment its processes (and so its workers) inherit;
    a value the caller set wins. A cluster started elsewhere takes its settings from its own `ray start`."""
    added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ} if local else {}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def token_file(env: Mapping[str, str] | None = None) -> Path:
    """Where Ray reads its auth token: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's default)."""
    env = os.environ if env is None else env
    return Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser() if env.get("RAY_AUTH_TOKEN_PATH") else \
        Path.home() / ".ray" / "auth_token"


def private_token_file() -> None:
    """Make the auth token file readable by its owner only: Ray 2.60 writes it with the umask (0644 usually)."""
    path = token_file()
    if path.is_file() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


# ------------------------------------------------------------------------------------------------ resources
@dataclass(frozen=True)
class NodeGroup:
    """A node type an autoscaler may start: resources per node and how many (-1 = unbounded)."""

    name: str
    resources: dict[str, float]
    max_count: int


@dataclass(frozen=True)
class Capacity:
    """What a cluster has now (live nodes) and what its autoscaler may add."""

    live: list[dict[str, float]]
    groups: list[NodeGroup] = field(default_factory=list)
    autoscaling: bool = False  # an autoscaler runs (with or without reported node groups)

    @classmethod
    def from_nodes(cls, nodes: list[dict], groups: list[NodeGroup] | None = None,
                   autoscaling: bool = False) -> Capacity:
        """From `ray.nodes()` entries (`Alive`, `Resources`)."""
        live = [dict(n.get("Resources", {})) for n in nodes if n.get("Alive")]
        return cls(live, list(groups or []), autoscaling or bool(groups))


def cluster_capacity() -> Capacity:
    """The connected Ray cluster's live nodes and its autoscaler's node groups (when it reports them)."""
    from ray._private.state import state  # private: pinned ray, what Train V2 reads for the same purpose
    from ray.experimental import internal_kv

    config = state.get_cluster_config()
    groups = [NodeGroup(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
              for g in (config.node_group_configs if config is not None else [])]
    status = internal_kv._internal_kv_get("__autoscaling_status") if internal_kv._internal_kv_initialized() else None
    return Capacity.from_nodes(ray.nodes(), groups, autoscaling=bool(groups) or v1_autoscaler_runs(status))


def v1_autoscaler_runs(status: bytes | None) -> bool:
    """Whether Ray's v1 autoscaler manages node types, from the status it writes (it reports no node groups). A
    cluster without an autoscaler (local, or `ray start` by hand) writes the same status marked "legacy"."""
    try:
        report = json.loads(status or b"{}").get("autoscaler_report") or {}
    except (ValueError, AttributeError):
        return False
    return bool(report) and not report.get("legacy", False)


def placements(bundle: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many copies of `bundle` (e.g. {"CPU": 1, "GPU": 0.5}) fit on one node with `resources`."""
    needs = {k: v for k, v in bundle.items() if v > 0}
    if not needs:
        return 1 << 30
    return min(math.floor(resources.get(k, 0.0) / v + _EPS) for k, v in needs.items())


def _describe(capacity: Capacity) -> str:
    cpu = sum(r.get("CPU", 0.0) for r in capacity.live)
    gpu = sum(r.get("GPU", 0.0) for r in capacity.live)
    shapes = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in capacity.live) or "no live nodes"
    text = f"the Ray cluster has {cpu:g} CPUs and {gpu:g} GPUs on {len(capacity.live)} node(s) ({shapes})"
    if capacity.groups:
        text += "; its autoscaler may add " + ", ".join(
            f"{g.name}: {'any number' if g.max_count < 0 else f'up to {g.max_count}'} x "
            f"{g.resources.get('CPU', 0):g} CPU/{g.resources.get('GPU', 0):g} GPU" for g in capacity.groups)
    return text


def check_resources(bundle: Mapping[str, float], count: int, capacity: Capacity, *, ask: str, unit: str, fix: str,
                    warn: Callable[[str], None] | None = None) -> None:
    """Refuse (one line) a request of `count` x `bundle` that no node, live or addable, can ever host together.

    Args:
        bundle: Resources of one unit, Ray's keys ("CPU", "GPU").
        count: Units that must be placed at once (Train workers); 1 for a trial.
        capacity: From `cluster_capacity()` (or `Capacity.from_nodes` in tests).
        ask: What was asked, as the user wrote it ("a trial asks for 1 CPU and 0.5 GPU").
        unit: Name of one unit in the message ("worker", "trial").
        fix: What to change.
        warn: Where the warning goes when an autoscaler runs but reports no node groups (default stderr).

    Raises:
        UserError: naming what was asked, what the cluster has and the fix.
    """
    live = sum(placements(bundle, r) for r in capacity.live)
    addable = sum(placements(bundle, g.resources) * (1 << 30 if g.max_count < 0 else g.max_count)
                  for g in capacity.groups)
    if live + addable >= count:
        return
    message = f"{ask} cannot be placed: {_describe(capacity)}, room for {live + addable} such {unit}(s); {fix}"
    if capacity.autoscaling and not capacity.groups:
        (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: {message} (an autoscaler runs and may add nodes "
                                                        "that fit: waiting for it)")
        return
    raise UserError(message)
