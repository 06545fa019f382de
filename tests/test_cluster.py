"""The one resource pre-check and Ray start-up rule (cleansweep.runtime.cluster), on plain data and on a real local Ray.

The shipped KubeRay cluster (deploy/kuberay/raycluster.yaml) keeps its GPU group at 0 replicas and lets the
autoscaler add GPU nodes on demand: a pre-check that only counted live nodes refused every paper grid there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cleansweep.errors import UserError
from cleansweep.pretrain import driver as pretrain
from cleansweep.runtime import cluster
from cleansweep.sweep import driver

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _shipped_node_groups(gpu_max: int | None = None) -> list[cluster.NodeGroup]:
    """The node groups the KubeRay autoscaler derives from the shipped RayCluster (Ray's own translation)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = yaml.safe_load((ROOT / "deploy" / "kuberay" / "raycluster.yaml").read_text())
    cr["metadata"]["namespace"] = "default"
    if gpu_max is not None:
        next(g for g in cr["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")["maxReplicas"] = gpu_max
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    return [cluster.NodeGroup(name, {k: float(v) for k, v in t["resources"].items()}, int(t["max_workers"]))
            for name, t in types.items() if t["max_workers"] > 0]


def _paper_resources() -> tuple[float, float]:
    res = yaml.safe_load((ROOT / "search_spaces" / "paper_D01.yaml").read_text())["resources"]
    return float(res["cpu"]), float(res["gpu"])


HEAD_ONLY = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8e9}}]  # the shipped head: 2 CPUs, no GPU


def test_placements_count_whole_bundles():
    assert cluster.placements({"CPU": 1, "GPU": 0.5}, {"CPU": 8, "GPU": 1}) == 2
    assert cluster.placements({"CPU": 0.1}, {"CPU": 1}) == 10  # float error absorbed
    assert cluster.placements({"CPU": 3}, {"CPU": 2}) == 0
    assert cluster.placements({"CPU": 1, "GPU": 1}, {"CPU": 64}) == 0


def test_gpu_trials_fit_the_shipped_autoscaling_cluster():
    cpu, gpu = _paper_resources()
    with pytest.raises(UserError, match="no live nodes|2 CPU/0 GPU"):  # live nodes only: refused (the old check)
        driver.check_trial_resources(cpu, gpu, cluster.Capacity.from_nodes(HEAD_ONLY))
    driver.check_trial_resources(cpu, gpu, cluster.Capacity.from_nodes(HEAD_ONLY, _shipped_node_groups()))
    pretrain.check_resources(2, 8, True, cluster.Capacity.from_nodes(HEAD_ONLY, _shipped_node_groups()))
    with pytest.raises(UserError, match="room for 2 such worker"):  # 2 GPU nodes at most
        pretrain.check_resources(3, 8, True, cluster.Capacity.from_nodes(HEAD_ONLY, _shipped_node_groups()))
    with pytest.raises(UserError) as e:  # a GPU group that may never grow: still refused, saying what it has
        driver.check_trial_resources(cpu, gpu, cluster.Capacity.from_nodes(HEAD_ONLY, _shipped_node_groups(0)))
    assert "autoscaler may add cpu: up to 4 x 4 CPU/0 GPU" in str(e.value) and "\n" not in str(e.value)


def test_an_autoscaler_without_node_groups_warns_instead_of_refusing():
    warned: list[str] = []
    capacity = cluster.Capacity.from_nodes(HEAD_ONLY, autoscaling=True)
    cluster.check_resources({"CPU": 8, "GPU": 1}, 1, capacity, ask="a trial", unit="trial", fix="fix it",
                            warn=warned.append)
    assert len(warned) == 1 and warned[0].startswith("warning: a trial cannot be placed") and "autoscaler" in warned[0]


def test_ray_address_rule():
    assert cluster.ray_address("10.0.0.1:6379", env={"RAY_ADDRESS": "x:1"}) == "10.0.0.1:6379"
    assert cluster.ray_address(None, env={"RAY_ADDRESS": "x:1"}) == "x:1"  # what `ray job submit` sets
    assert cluster.ray_address(None, env={}) == "local"  # a fresh local cluster, never /tmp/ray's last one


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    """A real local Ray with token auth, its token in a temp HOME."""
    import ray
    from ray._raylet import AuthenticationTokenLoader

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    AuthenticationTokenLoader.instance().reset_cache()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        AuthenticationTokenLoader.instance().reset_cache()


@pytest.mark.integration
def test_capacity_reads_what_an_autoscaler_reports_to_a_real_cluster(local_ray):
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    cpu, gpu = _paper_resources()
    plain = cluster.cluster_capacity()
    assert len(plain.live) == 1 and plain.live[0]["CPU"] == 2 and not plain.autoscaling and not plain.groups
    with pytest.raises(UserError, match="resources.gpu"):
        driver.check_trial_resources(cpu, gpu, plain)

    # What an autoscaler reports into the GCS (the key Ray Train V2 reads too): the shipped cluster's node groups.
    config = autoscaler_pb2.ClusterConfig()
    for group in _shipped_node_groups():
        g = config.node_group_configs.add(name=group.name, max_count=group.max_count)
        for key, value in group.resources.items():
            g.resources[key] = int(value)
    internal_kv._internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                                 namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
    reported = cluster.cluster_capacity()
    assert reported.autoscaling and {g.name: g.max_count for g in reported.groups} == {"cpu": 4, "gpu": 2}
    driver.check_trial_resources(cpu, gpu, reported)

    # The v1 autoscaler reports only a status; a cluster without one writes it marked "legacy" (or, in its first
    # seconds, not yet at all): this local cluster's own status, whichever it is now, says no autoscaler runs.
    status = internal_kv._internal_kv_get("__autoscaling_status")
    assert not cluster.v1_autoscaler_runs(status)
    legacy = {"autoscaler_report": {"legacy": True, "node_type_mapping": {}}}
    assert not cluster.v1_autoscaler_runs(json.dumps(legacy).encode())
    kuberay = {"autoscaler_report": {"legacy": False, "node_type_mapping": {"n1": "headgroup"}}}
    assert cluster.v1_autoscaler_runs(json.dumps(kuberay).encode()) and not cluster.v1_autoscaler_runs(None)


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket the processes `pids` listen on."""
    import psutil

    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.mark.integration
def test_a_local_cluster_listens_on_loopback_only_and_keeps_its_token_private(tmp_path, monkeypatch):
    """Every socket of every Ray process (GCS, raylet, workers, dashboard and its agent, the three Prometheus
    endpoints) is on loopback; the token Ray writes with the umask ends up 0600. Without `loopback_node` the gRPC
    servers listen on all interfaces and the Prometheus ones on the host's address."""
    import time

    import psutil
    import ray
    from ray._raylet import AuthenticationTokenLoader

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        with cluster.connect(None, echo=lambda line: None) as started:
            assert started

            @ray.remote
            def node_address() -> str:
                return ray.util.get_node_ip_address()

            assert ray.get(node_address.remote()) == "127.0.0.1"  # a worker process is up, and listens too
            time.sleep(5)  # the metrics endpoints start a few seconds after ray.init returns
            pids = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
            sockets = _listening(pids)
            ports = {port for _, port, _ in sockets}
            token = tmp_path / ".ray" / "auth_token"
            mode = token.stat().st_mode & 0o777
    finally:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        AuthenticationTokenLoader.instance().reset_cache()
    assert len(sockets) >= 8, sockets  # gcs, raylet x2, dashboard, agent x3, metrics endpoints, workers
    assert 8265 in ports  # the dashboard
    assert [s for s in sockets if not _is_loopback(s[0])] == []
    assert mode == 0o600, oct(mode)


def test_token_file_follows_ray_auth_token_path(tmp_path):
    assert cluster.token_file({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}) == tmp_path / "t"
    assert cluster.token_file({}) == Path.home() / ".ray" / "auth_token"
