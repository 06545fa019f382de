"""Deployment artefacts in deploy/, checked offline (no Docker engine, no Kubernetes cluster needed).

Every YAML parses; the KubeRay manifests validate against the pinned KubeRay CRDs (strict, like `kubectl apply`) and
carry token auth, a ClusterIP head, resources and the MLflow URI; the RayJob entrypoints are real `cleansweep`
commands; the Dockerfiles and the MLflow stacks hold no secrets and no floating tags.

Each check is a function returning a list of problems. The tests assert the list is empty for the shipped files, and
`test_check_catches_broken_input` feeds each check a deliberately broken copy to show that it can fail.
"""

from __future__ import annotations

import argparse
import configparser
import copy
import hashlib
import importlib.util
import os
import re
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cleansweep.cli import build_parser
from cleansweep.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
MLFLOW = DEPLOY / "mlflow"
IMAGE_WORKDIR = "/app"  # deploy/Dockerfile's WORKDIR: entrypoint paths under it are repository paths in the image
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode"}  # KubeRay's non-interactive modes
# Subcommands other helpers are adding; until they land, only the entrypoint check of a RayJob using them is skipped.

_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY", re.IGNORECASE)
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
_URI_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s]+)@")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB: the C loader parses them in < 1 s


def load_docs(path: Path) -> list:
    """All YAML documents of a file (empty documents dropped)."""
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def constraint_pins(text: str) -> dict[str, str]:
    """Canonical name -> pinned version from a pip constraints file of `name==version` lines."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _walk_strings(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_strings(v, f"{path}[{i}]")
    elif isinstance(obj, str):
        yield path, obj


def _containers(pod_template: dict) -> list[dict]:
    spec = pod_template.get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _flags(args: list[str]) -> dict[str, str]:
    """`--flag=value` and `--flag value` items of a command line -> {flag: value}."""
    out = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            out[name] = value if eq else (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "")
    return out


# ---------------------------------------------------------------------------------------------- secrets
def secret_problems(obj, where: str) -> list[str]:
    """Literal credentials or defaulted secret variables anywhere in a parsed manifest."""
    problems = []
    for path, s in _walk_strings(obj):
        for name, rest in _VAR_REF.findall(s):
            if _SECRET_NAME.search(name) and not rest.startswith((":?", "?")):
                problems.append(f"{where}{path}: ${{{name}{rest}}} must be required (${{{name}:?...}}), no default")
        for password in _URI_PASSWORD.findall(s):
            if not password.startswith(("${", "$(")):
                problems.append(f"{where}{path}: literal password in a URI")
    for path, env in _env_blocks(obj):
        # Compose: {NAME: value} or ["NAME=value" | "NAME" (passed through)]; Kubernetes: [{name, value | valueFrom}].
        items = env.items() if isinstance(env, dict) else [
            (e.get("name", ""), e.get("value")) if isinstance(e, dict) else _split_env(str(e)) for e in env]
        for name, value in items:
            if _SECRET_NAME.search(str(name)) and isinstance(value, str) and not value.startswith(("${", "$(")):
                problems.append(f"{where}{path}: {name} has a literal value; reference a Secret / required variable")
    return problems


def _split_env(item: str) -> tuple[str, str | None]:
    name, sep, value = item.partition("=")
    return name, value if sep else None


def _env_blocks(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("env", "environment") and isinstance(v, dict | list):
                yield f"{path}.{k}", v
            yield from _env_blocks(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _env_blocks(v, f"{path}[{i}]")


# -------------------------------------------------------------------------------------------- KubeRay CRDs
def crd_dir() -> Path:
    env = os.environ.get("CLEANSWEEP_KUBERAY_CRDS")
    return Path(env) if env else KUBERAY / "crds"


def strict_schema(schema):
    """An OpenAPI v3 CRD schema in which unknown fields are errors, as kubectl's strict field validation makes them.

    CRD schemas leave `additionalProperties` open (the API server prunes or rejects unknown fields itself), so a
    plain validation would accept `authOption:` for `authOptions:`. Closing every object that lists its properties
    (and does not preserve unknown fields) restores that check.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = strict_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict_schema(s) for s in schema[key]]
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    """Kind -> strict validator of the pinned KubeRay CRDs' v1 schema."""
    folder = crd_dir()
    assert folder.is_dir(), f"KubeRay CRDs not found at {folder}; point CLEANSWEEP_KUBERAY_CRDS at them"
    validators = {}
    for line in (KUBERAY / "crds.sha256").read_text().split("\n"):
        if not line.strip():
            continue
        digest, name = line.split()
        path = folder / name
        assert path.is_file(), f"{path} missing: the pinned KubeRay v1.7.0 CRD (deploy/kuberay/crds.sha256)"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == digest, f"{path} is not the pinned KubeRay v1.7.0 CRD (sha256 {actual}); see deploy/kuberay"
        crd = load_one(path)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        # No format_checker: OpenAPI formats (int32, int-or-string, date-time) are not enforced, as jsonschema's
        # default; the x-kubernetes-* keywords are unknown to jsonschema and ignored.
        schema = strict_schema(v1["schema"]["openAPIV3Schema"])
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def schema_problems(doc: dict, validators: dict) -> list[str]:
    """jsonschema errors of a ray.io manifest against its CRD, one line each, with the field path."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion {doc.get('apiVersion')!r}: expected ray.io/v1"]
    if doc.get("kind") not in validators:
        return [f"kind {doc.get('kind')!r}: no CRD for it among {sorted(validators)}"]
    errors = validators[doc["kind"]].iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))]


# ------------------------------------------------------------------------------------------ RayCluster spec
def mlflow_service_uri() -> str:
    """http://<service>:<port> of the MLflow Service in deploy/mlflow/k8s.yaml: the URI Ray pods must use."""
    (svc,) = [d for d in load_docs(MLFLOW / "k8s.yaml") if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"]
    return f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def raycluster_spec_problems(spec: dict, *, version: str, ray_version: str, mlflow_uri: str) -> list[str]:
    """What a cleansweep RayCluster spec must hold beyond the schema."""
    problems = []
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be 'token' (KubeRay >= 1.6): an open dashboard runs anyone's code")
    if spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != the image's ray {ray_version}")
    head = spec.get("headGroupSpec", {})
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("head Service must stay ClusterIP without Ingress: reach the dashboard by port-forward")
    if not head.get("template", {}).get("spec", {}).get("containers"):
        problems.append("headGroupSpec.template has no containers")
    groups = spec.get("workerGroupSpecs", [])
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"duplicate worker groupNames {names}")
    for g in groups:
        missing = [k for k in ("groupName", "minReplicas", "maxReplicas", "template") if k not in g]
        if missing:
            problems.append(f"worker group {g.get('groupName')}: missing {missing}")
            continue
        if not 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
            problems.append(f"worker group {g['groupName']}: need 0 <= minReplicas <= replicas <= maxReplicas")
    if "cpu" not in names:
        problems.append("no 'cpu' worker group")
    for g in (g for g in groups if g.get("groupName") == "gpu"):
        limits = [c.get("resources", {}).get("limits", {}) for c in _containers(g.get("template", {}))]
        if g.get("minReplicas") != 0 or not limits or not all("nvidia.com/gpu" in lim for lim in limits):
            problems.append("the optional 'gpu' group must scale from minReplicas 0 and limit nvidia.com/gpu")
    pods = [("head", head.get("template", {}))] + [(g.get("groupName"), g.get("template", {})) for g in groups]
    for group, template in pods:
        for c in _containers(template):
            where = f"{group}/{c.get('name')}"
            allowed = {f"cleansweep:{version}", f"cleansweep:{version}-gpu"}
            if c.get("image", "").rsplit("/", 1)[-1] not in allowed:
                problems.append(f"{where}: image {c.get('image')!r} is not one of {sorted(allowed)}")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind, {})):
                    problems.append(f"{where}: resources.{kind} needs cpu and memory")
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("MLFLOW_TRACKING_URI", {}).get("value") != mlflow_uri:
                problems.append(f"{where}: MLFLOW_TRACKING_URI must be {mlflow_uri} (deploy/mlflow/k8s.yaml)")
        if template.get("spec", {}).get("hostNetwork"):
            problems.append(f"{group}: hostNetwork exposes Ray's ports on the node")
    return problems


def rayjob_problems(doc: dict, cluster_spec: dict) -> list[str]:
    """RayJob lifecycle fields, and its cluster being raycluster.yaml's."""
    spec, problems = doc.get("spec", {}), []
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("entrypoint missing")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (the cluster is the job's own)")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
        problems.append("ttlSecondsAfterFinished must be an integer >= 0")
    if not isinstance(spec.get("activeDeadlineSeconds"), int) or spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds must be a positive integer")
    if spec.get("submissionMode") not in SUBMISSION_MODES:
        problems.append(f"submissionMode {spec.get('submissionMode')!r} not in {sorted(SUBMISSION_MODES)}")
    if spec.get("rayClusterSpec") != cluster_spec:
        problems.append("rayClusterSpec differs from deploy/kuberay/raycluster.yaml's spec: keep them identical")
    return problems


# ----------------------------------------------------------------------------------------- entrypoints
def cli_subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def entrypoint_problems(entrypoint: str, parser: argparse.ArgumentParser, dockerfile: str) -> list[str]:
    """The entrypoint is `cleansweep <subcommand> ...`, parses with the real CLI, and its files are in the image."""
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] != "cleansweep":
        return [f"entrypoint {entrypoint!r} is not `cleansweep <subcommand> ...`"]
    if argv[1] not in cli_subcommands(parser):
        return [f"`cleansweep {argv[1]}` is not a subcommand of cleansweep.cli ({sorted(cli_subcommands(parser))})"]
    problems = []
    try:
        parser.parse_args(argv[1:])
    except (UserError, SystemExit) as e:
        problems.append(f"`{entrypoint}` does not parse: {e}")
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", dockerfile, flags=re.MULTILINE)
    for arg in argv[2:]:
        if arg.endswith((".yaml", ".yml", ".json")) and arg.startswith(f"{IMAGE_WORKDIR}/"):
            rel = arg.removeprefix(f"{IMAGE_WORKDIR}/")
            if not (REPO / rel).is_file():
                problems.append(f"{arg}: {rel} is not in the repository")
            if rel.split("/")[0] not in copied:
                problems.append(f"{arg}: deploy/Dockerfile does not COPY {rel.split('/')[0]}")
        elif arg.endswith((".yaml", ".yml", ".json")):
            problems.append(f"{arg}: use an absolute path under {IMAGE_WORKDIR}/ (a Ray job's working dir is not it)")
    return problems


DEPRECATED_COMMANDS = {"study matrix": "matrix"}  # an old spelling the CLI still accepts -> the command to document


def documented_commands(text: str) -> list[str]:
    """The `cleansweep ...` commands of a Markdown text: inline code, and lines of fenced blocks that start with one."""
    inline = re.findall(r"`cleansweep ([^`]+)`", text)
    fenced = [line.strip().removeprefix("cleansweep ") for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
              for line in block.splitlines() if line.strip().startswith("cleansweep ")]
    return [c.split("#")[0].strip() for c in inline + fenced]


def documented_command_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every documented `cleansweep <subcommand>` is a subcommand of the real CLI, never a deprecated spelling."""
    problems, subcommands = [], cli_subcommands(parser)
    for command in documented_commands(text):
        words = command.split()
        if not words or words[0].startswith("-"):
            continue  # `cleansweep --version`
        if words[0] not in subcommands:
            problems.append(f"`cleansweep {command}`: {words[0]} is not a subcommand ({sorted(subcommands)})")
        if (old := " ".join(words[:2])) in DEPRECATED_COMMANDS:
            problems.append(f"`cleansweep {command}`: document `cleansweep {DEPRECATED_COMMANDS[old]}` instead")
    return problems


# ------------------------------------------------------------------------------------------ Dockerfiles
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        logical.append(buf.strip())
        buf = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in logical]


def dockerfile_problems(text: str, *, base: str, entrypoint: str) -> list[str]:
    """Structural lint: pinned bases, no remote ADD, non-root, the right entrypoint, no secrets in ENV/ARG."""
    ins = dockerfile_instructions(text)
    problems = []
    froms = [next(t for t in args.split() if not t.startswith("--")) for op, args in ins if op == "FROM"]
    if not froms:
        problems.append("no FROM")
    elif froms[0] != base:
        problems.append(f"base image {froms[0]!r}, expected {base!r}")
    for image in froms:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "$" in image or not tag or tag == "latest":
            problems.append(f"FROM {image}: pin a tag (never latest, never a variable)")
    for op, args in ins:
        if op == "ADD" and re.search(r"\b(https?|git)://|git@", args):
            problems.append(f"ADD {args}: fetch remote files in a checked RUN step, never ADD a URL")
        if op in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_]\w*)=", args) or args.split()[:1]  # `K=v ...` or `K v`
            for name in names:
                if _SECRET_NAME.search(name):
                    problems.append(f"{op} {name}: secrets come at run time, never baked into the image")
    users = [args.split(":")[0].strip() for op, args in ins if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the final USER must be a non-root user")
    entry = [args for op, args in ins if op == "ENTRYPOINT"]
    if not entry or entrypoint not in entry[-1]:
        problems.append(f"ENTRYPOINT must run {entrypoint}")
    return problems


def cleansweep_dockerfile_problems(text: str, pins: dict[str, str]) -> list[str]:
    """deploy/Dockerfile: the generic lint plus pinned installs, the search spaces in the image, and the GPU arg."""
    problems = dockerfile_problems(text, base="python:3.11-slim", entrypoint="cleansweep")
    runs = [args for op, args in dockerfile_instructions(text) if op == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    if not any(re.search(r"pip install .*-c /tmp/constraints\.txt \.(\s|$)", r) for r in installs):
        problems.append("the project must be installed with `pip install -c /tmp/constraints.txt .`")
    if any("-c " not in r for r in installs):
        problems.append("every pip install must use the constraints file (deploy/constraints.txt)")
    if not re.search(r"^COPY deploy/constraints\.txt ", text, flags=re.MULTILINE):
        problems.append("deploy/constraints.txt is not copied into the image")
    if not re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, flags=re.MULTILINE):
        problems.append("ARG TORCH_INDEX_URL must default to the CPU wheel index (the GPU build overrides it)")
    if not re.search(r"^COPY search_spaces ", text, flags=re.MULTILINE):
        problems.append("search_spaces/ is not copied into the image")
    for name in ("torch", "torchvision", "ray", "mlflow"):
        if name not in pins:
            problems.append(f"deploy/constraints.txt does not pin {name}")
    return problems


def mlflow_dockerfile_problems(text: str) -> list[str]:
    problems = dockerfile_problems(text, base="python:3.11-slim", entrypoint="mlflow")
    if not re.search(r"^ARG MLFLOW_VERSION=3\.17\.\d+$", text, flags=re.MULTILINE):
        problems.append("ARG MLFLOW_VERSION must default to a 3.17.x release (pyproject pins mlflow 3.17)")
    if 'pip install "mlflow[auth,db]==${MLFLOW_VERSION}"' not in text:
        problems.append("install mlflow[auth,db]==${MLFLOW_VERSION} (basic-auth app and PostgreSQL driver)")
    return problems


def constraints_problems(pyproject: dict, pins: dict[str, str]) -> list[str]:
    """Every runtime dependency of pyproject.toml is pinned in the constraints, inside its allowed range."""
    problems = []
    for line in pyproject["project"]["dependencies"]:
        req = Requirement(line)
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not pinned in deploy/constraints.txt")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}=={pinned} is outside pyproject's {req.specifier}")
    return problems


# ------------------------------------------------------------------------------------------ MLflow stacks
def compose_problems(compose: dict) -> list[str]:
    """docker-compose.yaml: PostgreSQL 16, mlflow 3.17 with basic-auth, loopback only, no secrets."""
    problems = secret_problems(compose, "compose")
    services, volumes = compose.get("services", {}), compose.get("volumes", {}) or {}
    pg, ml = services.get("postgres", {}), services.get("mlflow", {})
    if not str(pg.get("image", "")).startswith("postgres:16"):
        problems.append(f"postgres image {pg.get('image')!r} is not PostgreSQL 16")
    if not pg.get("healthcheck", {}).get("test"):
        problems.append("postgres has no healthcheck")
    for svc_name, svc in services.items():
        for mount in svc.get("volumes", []):
            source = str(mount).split(":")[0]
            if not source.startswith((".", "/")) and source not in volumes:
                problems.append(f"{svc_name}: volume {source!r} is not a declared named volume")
        for port in svc.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{svc_name}: port {port!r} is published beyond loopback")
    if ml.get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("mlflow must wait for a healthy postgres")
    mlflow_version = str(ml.get("build", {}).get("args", {}).get("MLFLOW_VERSION", ""))
    if not re.fullmatch(r"3\.17\.\d+", mlflow_version) or not str(ml.get("image", "")).endswith(f":{mlflow_version}"):
        problems.append(f"mlflow must be pinned to 3.17.x in build args and image tag (got {mlflow_version!r})")
    problems += mlflow_command_problems(ml.get("command", []), "compose mlflow")
    required = {"PGPASSWORD": "POSTGRES_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY": "MLFLOW_FLASK_SERVER_SECRET_KEY",
                "MLFLOW_AUTH_ADMIN_PASSWORD": "MLFLOW_AUTH_ADMIN_PASSWORD"}
    for var, source in required.items():
        if not str((ml.get("environment") or {}).get(var, "")).startswith(f"${{{source}:?"):
            problems.append(f"compose mlflow: {var} must be ${{{source}:?...}} from .env (required, no default)")
    return problems


def mlflow_command_problems(args: list[str], where: str) -> list[str]:
    flags, problems = _flags(args), []
    if not args or args[0] != "server":
        problems.append(f"{where}: must run `mlflow server`")
    if flags.get("--host") != "0.0.0.0":
        problems.append(f"{where}: --host 0.0.0.0 (inside the container network; exposure is decided outside)")
    if not flags.get("--backend-store-uri", "").startswith("postgresql://"):
        problems.append(f"{where}: --backend-store-uri must be postgresql://")
    if not flags.get("--artifacts-destination"):
        problems.append(f"{where}: --artifacts-destination missing (artifacts proxied by the server)")
    if not flags.get("--allowed-hosts") or "*" in flags["--allowed-hosts"].split(","):
        problems.append(f"{where}: --allowed-hosts must list the Host headers (no '*')")
    if flags.get("--app-name") != "basic-auth":
        problems.append(f"{where}: --app-name=basic-auth (users and passwords) must be on by default")
    return problems + command_line_secret_problems(args, where)


def command_line_secret_problems(args: list[str], where: str) -> list[str]:
    """A password on a command line, literal or expanded from a variable (`$(VAR)`, `${VAR}`): `ps` shows it to every
    process on the node. Secrets go into the environment (PGPASSWORD for libpq, MLFLOW_* for mlflow)."""
    problems = []
    for arg in args:
        if _URI_PASSWORD.search(arg):
            problems.append(f"{where}: {arg.split('=')[0]} carries a password in a URI; pass it as PGPASSWORD")
        for name in re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)", arg):
            if _SECRET_NAME.search(name):
                problems.append(f"{where}: {name} is expanded onto the command line; pass it in the environment")
    return problems


def networkpolicy_problems(policy: dict | None, *, selects: dict, peers: dict, open_ports: set[int],
                           where: str) -> list[str]:
    """An Ingress NetworkPolicy that selects pods labelled `selects`, admits pods labelled `peers`, and admits nobody
    else except on `open_ports` (empty: nobody else at all). `from` entries that are absent or empty admit anyone."""
    if policy is None:
        return [f"{where}: no NetworkPolicy"]
    spec, problems = policy.get("spec", {}), []
    if spec.get("podSelector", {}).get("matchLabels") != selects:
        problems.append(f"{where}: podSelector must be exactly {selects}")
    if "Ingress" not in spec.get("policyTypes", []):
        problems.append(f"{where}: policyTypes must include Ingress")
    rules = spec.get("ingress", [])
    if not any(peer.get("podSelector", {}).get("matchLabels") == peers and "namespaceSelector" not in peer
               for rule in rules for peer in rule.get("from", [])):
        problems.append(f"{where}: pods {peers} are not admitted")
    for rule in rules:
        peers_here = rule.get("from") or [{}]
        ports = {p.get("port") for p in rule.get("ports", [])}
        for peer in peers_here:
            if peer.get("podSelector", {}).get("matchLabels") == peers and "namespaceSelector" not in peer:
                continue
            if not rule.get("ports") or not ports <= open_ports:
                problems.append(f"{where}: {peer or 'anyone'} admitted on {sorted(ports) or 'every port'}; only "
                                f"{sorted(open_ports) or 'nothing'} may be open beyond {peers}")
    return problems


def _pod_labels(template: dict) -> dict:
    return template.get("metadata", {}).get("labels", {})


def _policy(docs: list[dict], name: str) -> dict | None:
    return next((d for d in docs if d.get("kind") == "NetworkPolicy" and d["metadata"]["name"] == name), None)


def mlflow_k8s_problems(docs: list[dict], ray_mlflow_uri: str) -> list[str]:
    """deploy/mlflow/k8s.yaml: Deployment + ClusterIP Service + PostgreSQL StatefulSet, Secrets referenced only."""
    problems = secret_problems(docs, "k8s")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for need in (("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "postgres"), ("Service", "postgres")):
        if need not in kinds:
            problems.append(f"k8s.yaml lacks {need[0]} {need[1]}")
    if any(d["kind"] == "Secret" for d in docs):
        problems.append("k8s.yaml embeds a Secret: reference one created out of band instead")
    for d in docs:
        if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {d['metadata']['name']} must be ClusterIP (port-forward to reach it)")
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in _containers(d["spec"]["template"]):
                if not {"requests", "limits"} <= set(c.get("resources", {})):
                    problems.append(f"{d['metadata']['name']}/{c['name']}: resources requests and limits")
                if c["image"].endswith(":latest") or ":" not in c["image"]:
                    problems.append(f"{d['metadata']['name']}/{c['name']}: pin the image tag")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"] or [None]
    if deploy:
        (c,) = deploy["spec"]["template"]["spec"]["containers"]
        if not re.search(r":3\.17\.\d+$", c["image"]):
            problems.append(f"mlflow image {c['image']!r} is not pinned to 3.17.x")
        args = c.get("args", [])
        problems += mlflow_command_problems(args, "k8s mlflow")
        if urlparse(ray_mlflow_uri).netloc not in _flags(args).get("--allowed-hosts", "").split(","):
            problems.append(f"--allowed-hosts lacks {urlparse(ray_mlflow_uri).netloc}: Ray pods would get 403")
        env = {e["name"]: e for e in c.get("env", [])}
        for var in ("PGPASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            if "secretKeyRef" not in env.get(var, {}).get("valueFrom", {}):
                problems.append(f"k8s mlflow: {var} must come from a Secret (valueFrom.secretKeyRef)")
        labels = _pod_labels(deploy["spec"]["template"])
        problems += networkpolicy_problems(_policy(docs, "mlflow"), selects=labels, peers=RAY_POD_LABELS,
                                           open_ports=set(), where="NetworkPolicy mlflow")
        if any(p.get("port") != 5000 for r in (_policy(docs, "mlflow") or {}).get("spec", {}).get("ingress", [])
               for p in r.get("ports", [{}])):
            problems.append("NetworkPolicy mlflow: admit the Ray pods on 5000 only")
    (pg,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres"] or [None]
    if deploy and pg:
        problems += networkpolicy_problems(
            _policy(docs, "mlflow-postgres"), selects=_pod_labels(pg["spec"]["template"]),
            peers=_pod_labels(deploy["spec"]["template"]), open_ports=set(), where="NetworkPolicy mlflow-postgres")
    return problems


RAY_POD_LABELS = {"app.kubernetes.io/name": "cleansweep"}  # on every Ray pod template in deploy/kuberay
HEAD_PORTS = {8265, 6379, 10001}  # dashboard + Jobs API, GCS, Ray client: the ways in to run code


def ray_networkpolicy_problems(docs: list[dict], ray_manifests: list[dict]) -> list[str]:
    """deploy/kuberay/networkpolicy.yaml: the head admits Ray pods, and others only on HEAD_PORTS; workers admit Ray
    pods only. Every Ray pod template carries RAY_POD_LABELS, or the policies would cut it off."""
    problems = networkpolicy_problems(
        _policy(docs, "cleansweep-ray-head"), selects={**RAY_POD_LABELS, "ray.io/node-type": "head"},
        peers=RAY_POD_LABELS, open_ports=HEAD_PORTS, where="NetworkPolicy cleansweep-ray-head")
    problems += networkpolicy_problems(
        _policy(docs, "cleansweep-ray-workers"), selects={**RAY_POD_LABELS, "ray.io/node-type": "worker"},
        peers=RAY_POD_LABELS, open_ports=set(), where="NetworkPolicy cleansweep-ray-workers")
    for doc in ray_manifests:
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
        for t in templates:
            if RAY_POD_LABELS.items() - _pod_labels(t).items():
                problems.append(f"{doc['metadata']['name']}: a pod template lacks labels {RAY_POD_LABELS}")
    return problems


def basic_auth_ini_problems(text: str, mlflow_default_ini: str) -> list[str]:
    """deploy/mlflow/basic_auth.ini: only keys mlflow knows, no admin password, users on the mounted auth volume."""
    ours, theirs = configparser.ConfigParser(), configparser.ConfigParser()
    ours.read_string(text)
    theirs.read_string(mlflow_default_ini)
    known = set(theirs["mlflow"]) | {"admin_password", "workspace_cache_max_size", "workspace_cache_ttl_seconds",
                                     "auth_cache_max_size", "auth_cache_ttl_seconds", "read_database_uri"}
    problems = [f"basic_auth.ini: unknown key {k!r}" for k in ours["mlflow"] if k not in known]
    if "admin_password" in ours["mlflow"]:
        problems.append("basic_auth.ini: admin_password comes from MLFLOW_AUTH_ADMIN_PASSWORD, never the file")
    if not ours["mlflow"].get("database_uri", "").startswith("sqlite:////mlflow/auth/"):
        problems.append("basic_auth.ini: database_uri must live on the /mlflow/auth volume (never the artifact root)")
    return problems


def env_example_problems(text: str) -> list[str]:
    return [f".env.example: {line.split('=')[0]} has a value; leave secrets empty"
            for line in text.splitlines()
            if not line.startswith("#") and "=" in line and _SECRET_NAME.search(line.split("=")[0])
            and line.split("=", 1)[1].strip()]


# =============================================================================================== tests
ALL_YAML = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
RAY_MANIFESTS = [p for p in ALL_YAML if any(d.get("apiVersion", "").startswith("ray.io/") for d in load_docs(p))]
RAYJOBS = [p for p in RAY_MANIFESTS if load_one(p)["kind"] == "RayJob"]


def test_expected_artefacts_exist():
    for rel in ("Dockerfile", "README.md", "constraints.txt", "kuberay/raycluster.yaml", "kuberay/rayjob-search.yaml",
                "kuberay/rayjob-pretrain.yaml", "kuberay/storage.yaml", "kuberay/crds.sha256", "mlflow/Dockerfile",
                "mlflow/docker-compose.yaml", "kuberay/networkpolicy.yaml", "mlflow/k8s.yaml"):
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} missing"
    assert {p.name for p in RAY_MANIFESTS} == {"raycluster.yaml", "rayjob-search.yaml", "rayjob-pretrain.yaml"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"
    for d in docs:
        if "apiVersion" in d:  # Kubernetes objects: kind and a name
            assert d.get("kind") and d.get("metadata", {}).get("name"), f"{path}: Kubernetes object without kind/name"


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd_schema(path, crd_validators):
    assert schema_problems(load_one(path), crd_validators) == []


def test_raycluster_spec():
    pins = constraint_pins((DEPLOY / "constraints.txt").read_text())
    spec = load_one(KUBERAY / "raycluster.yaml")["spec"]
    assert raycluster_spec_problems(spec, version=project_version(), ray_version=pins["ray"],
                                    mlflow_uri=mlflow_service_uri()) == []


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_spec(path):
    assert rayjob_problems(load_one(path), load_one(KUBERAY / "raycluster.yaml")["spec"]) == []


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_is_a_cleansweep_command(path):
    entrypoint = load_one(path)["spec"]["entrypoint"]
    parser = build_parser()
    assert shlex.split(entrypoint)[1] in cli_subcommands(parser), entrypoint
    assert entrypoint_problems(entrypoint, parser, (DEPLOY / "Dockerfile").read_text()) == []


@pytest.mark.parametrize("path", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_documented_commands_are_subcommands(path):
    text = path.read_text()
    assert documented_command_problems(text, build_parser()) == []
    if path.name == "README.md":  # the check does read the commands
        assert {c.split()[0] for c in documented_commands(text)} >= {"search", "study", "matrix", "ui"}


def test_cleansweep_dockerfile():
    pins = constraint_pins((DEPLOY / "constraints.txt").read_text())
    assert cleansweep_dockerfile_problems((DEPLOY / "Dockerfile").read_text(), pins) == []


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert constraints_problems(pyproject, constraint_pins((DEPLOY / "constraints.txt").read_text())) == []


def test_mlflow_dockerfile():
    assert mlflow_dockerfile_problems((MLFLOW / "Dockerfile").read_text()) == []


def test_mlflow_compose():
    assert compose_problems(load_one(MLFLOW / "docker-compose.yaml")) == []
    assert env_example_problems((MLFLOW / ".env.example").read_text()) == []


def test_mlflow_basic_auth_ini():
    (pkg,) = importlib.util.find_spec("mlflow").submodule_search_locations  # no import of mlflow (seconds)
    default_ini = (Path(pkg) / "server" / "auth" / "basic_auth.ini").read_text()
    assert basic_auth_ini_problems((MLFLOW / "basic_auth.ini").read_text(), default_ini) == []
    assert basic_auth_ini_problems("[mlflow]\nadmin_password = admin\ndatabase_uri = sqlite:///x.db\n", default_ini)


def _server_commands() -> dict[str, list[str]]:
    """The mlflow server command lines of the compose files and k8s.yaml, variables replaced by a dummy value."""
    compose = load_one(MLFLOW / "docker-compose.yaml")["services"]["mlflow"]["command"]
    (deploy,) = [d for d in load_docs(MLFLOW / "k8s.yaml") if d["kind"] == "Deployment"]
    k8s = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    return {"compose": _fill(compose), "k8s": _fill(k8s)}


def _fill(args: list[str]) -> list[str]:
    """Compose `${VAR...}` and Kubernetes `$(VAR)` references replaced by a dummy value."""
    return [re.sub(r"\$\{[^}]*\}|\$\([A-Z_]+\)", "x", a) for a in args]


@pytest.mark.integration
@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_mlflow_server_flags_parse_with_installed_mlflow(where):
    # Importing mlflow's CLI costs seconds, hence integration. make_context parses without starting a server: an
    # unknown flag (or an --app-name mlflow does not ship) raises here, as `mlflow server` would at start-up.
    import click
    from mlflow.cli import server

    args = _server_commands()[where]
    assert args[0] == "server"
    params = server.make_context("server", args[1:]).params
    assert params["host"] == "0.0.0.0" and params["backend_store_uri"].startswith("postgresql://")
    assert params["app_name"] == "basic-auth"
    with pytest.raises(click.UsageError):
        server.make_context("server", [*args[1:], "--allowed-host=x"])


def test_mlflow_k8s():
    assert mlflow_k8s_problems(load_docs(MLFLOW / "k8s.yaml"), mlflow_service_uri()) == []


def test_ray_networkpolicies():
    assert ray_networkpolicy_problems(load_docs(KUBERAY / "networkpolicy.yaml"),
                                      [load_one(p) for p in RAY_MANIFESTS]) == []


def test_no_password_on_any_command_line_in_deploy():
    problems = []
    for path in ALL_YAML:
        for doc in load_docs(path):
            for where, args in _command_lines(doc):
                problems += command_line_secret_problems([str(a) for a in args], f"{path.name}{where}")
    assert problems == []
    assert command_line_secret_problems(["--backend-store-uri=postgresql://u:$(PGPASSWORD)@h/db"], "x")
    assert command_line_secret_problems(["--db", "postgresql://u:hunter2@h/db"], "x")


def _command_lines(obj, path=""):
    """(path, list) of every `command` / `args` list in a manifest (containers, compose services)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("command", "args") and isinstance(v, list):
                yield f"{path}.{k}", v
            elif k == "entrypoint" and isinstance(v, str):
                yield f"{path}.{k}", shlex.split(v)
            else:
                yield from _command_lines(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _command_lines(v, f"{path}[{i}]")


def test_no_literal_secrets_anywhere_in_deploy():
    problems = [p for path in ALL_YAML for p in secret_problems(load_docs(path), str(path.relative_to(DEPLOY)))]
    assert problems == []


# ------------------------------------------------------------------------------ each check can fail
def _set(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


_DELETE = object()


def _cluster(dotted: str, value) -> list[str]:
    spec = _set(load_one(KUBERAY / "raycluster.yaml")["spec"], dotted, value)
    ray_version = constraint_pins((DEPLOY / "constraints.txt").read_text())["ray"]
    return raycluster_spec_problems(spec, version=project_version(), ray_version=ray_version,
                                    mlflow_uri=mlflow_service_uri())


def _job(dotted: str, value) -> list[str]:
    return rayjob_problems(_set(load_one(KUBERAY / "rayjob-search.yaml"), dotted, value),
                           load_one(KUBERAY / "raycluster.yaml")["spec"])


def _dockerfile(old: str, new: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    assert old in text, old
    pins = constraint_pins((DEPLOY / "constraints.txt").read_text())
    return cleansweep_dockerfile_problems(text.replace(old, new), pins)


def _compose(dotted: str, value) -> list[str]:
    return compose_problems(_set(load_one(MLFLOW / "docker-compose.yaml"), dotted, value))


def _k8s(mutate: Callable[[list[dict]], None]) -> list[str]:
    docs = load_docs(MLFLOW / "k8s.yaml")
    mutate(docs)
    return mlflow_k8s_problems(docs, "http://mlflow:5000")


def _ray_policy(mutate: Callable[[list[dict]], None]) -> list[str]:
    docs = load_docs(KUBERAY / "networkpolicy.yaml")
    mutate(docs)
    return ray_networkpolicy_problems(docs, [load_one(p) for p in RAY_MANIFESTS])


def _mlflow_container(docs) -> dict:
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    return dep["spec"]["template"]["spec"]["containers"][0]


def _mlflow_arg(docs, index: int, value: str) -> None:
    _mlflow_container(docs)["args"][index] = value


def _mlflow_env(docs, name, value):
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    dep["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": name, "value": value})


BROKEN = {
    "auth disabled": lambda: _cluster("authOptions.mode", "disabled"),
    "auth removed": lambda: _cluster("authOptions", _DELETE),
    "head LoadBalancer": lambda: _cluster("headGroupSpec.serviceType", "LoadBalancer"),
    "max < min replicas": lambda: _cluster("workerGroupSpecs.0.maxReplicas", -1),
    "no limits": lambda: _cluster("workerGroupSpecs.0.template.spec.containers.0.resources.limits", _DELETE),
    "image latest": lambda: _cluster("headGroupSpec.template.spec.containers.0.image", "cleansweep:latest"),
    "wrong mlflow uri": lambda: _cluster("headGroupSpec.template.spec.containers.0.env.0.value", "http://x:1"),
    "gpu group min 1": lambda: _cluster("workerGroupSpecs.1.minReplicas", 1),
    "ray version drift": lambda: _cluster("rayVersion", "2.59.0"),
    "job keeps cluster": lambda: _job("spec.shutdownAfterJobFinishes", False),
    "job no deadline": lambda: _job("spec.activeDeadlineSeconds", _DELETE),
    "job interactive": lambda: _job("spec.submissionMode", "InteractiveMode"),
    "job cluster drift": lambda: _job("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 99),
    "entrypoint typo": lambda: entrypoint_problems("cleansweep evalute x.pt --eval-data d", build_parser(), ""),
    "entrypoint bad flag": lambda: entrypoint_problems("cleansweep data demo --out d --bogus 1", build_parser(), ""),
    "entrypoint missing file": lambda: entrypoint_problems(
        "cleansweep evaluate /app/search_spaces/nope.yaml --eval-data d", build_parser(), "COPY search_spaces ./x\n"),
    "entrypoint not cleansweep": lambda: entrypoint_problems("python train.py", build_parser(), ""),
    "documented typo": lambda: documented_command_problems("run `cleansweep serach s.yaml`", build_parser()),
    "documented old spelling": lambda: documented_command_problems("```\ncleansweep study matrix\n```", build_parser()),
    "dockerfile root": lambda: _dockerfile("USER 1000:1000", "USER root"),
    "dockerfile latest": lambda: _dockerfile("FROM python:3.11-slim", "FROM python:latest"),
    "dockerfile untagged": lambda: _dockerfile("FROM python:3.11-slim", "FROM python"),
    "dockerfile ADD url": lambda: _dockerfile("WORKDIR /app", "WORKDIR /app\nADD https://example.com/x.tgz /x"),
    "dockerfile secret": lambda: _dockerfile("WORKDIR /app", "WORKDIR /app\nENV RAY_AUTH_TOKEN=abc"),
    "dockerfile entrypoint": lambda: _dockerfile('ENTRYPOINT ["cleansweep"]', 'ENTRYPOINT ["python"]'),
    "dockerfile unpinned pip": lambda: _dockerfile("pip install -c /tmp/constraints.txt .", "pip install ."),
    "constraint out of range": lambda: constraints_problems(
        tomllib.loads((REPO / "pyproject.toml").read_text()),
        {**constraint_pins((DEPLOY / "constraints.txt").read_text()), "torch": "2.99.0"}),
    "compose default password": lambda: _compose("services.postgres.environment.POSTGRES_PASSWORD",
                                                 "${POSTGRES_PASSWORD:-changeme}"),
    "compose literal password": lambda: _compose("services.mlflow.command.3",
                                                 "--backend-store-uri=postgresql://mlflow:hunter2@postgres/mlflow"),
    "compose public port": lambda: _compose("services.mlflow.ports", ["5000:5000"]),
    "compose mlflow 3.18": lambda: _compose("services.mlflow.build.args.MLFLOW_VERSION", "3.18.0"),
    "compose postgres 15": lambda: _compose("services.postgres.image", "postgres:15.8"),
    "compose no healthcheck": lambda: _compose("services.postgres.healthcheck", _DELETE),
    "compose allow all hosts": lambda: _compose("services.mlflow.command.5", "--allowed-hosts=*"),
    "compose auth default key": lambda: _compose("services.mlflow.environment.MLFLOW_AUTH_ADMIN_PASSWORD",
                                                 "${MLFLOW_AUTH_ADMIN_PASSWORD:-admin}"),
    "compose auth off": lambda: _compose("services.mlflow.command.6", "--workers=2"),
    "compose password on command line": lambda: _compose(
        "services.mlflow.command.3", "--backend-store-uri=postgresql://mlflow:${POSTGRES_PASSWORD:?x}@postgres/mlflow"),
    "compose no PGPASSWORD": lambda: _compose("services.mlflow.environment.PGPASSWORD", _DELETE),
    "k8s password on command line": lambda: _k8s(lambda d: _mlflow_arg(
        d, 3, "--backend-store-uri=postgresql://mlflow:$(PGPASSWORD)@postgres:5432/mlflow")),
    "k8s auth off": lambda: _k8s(lambda d: _mlflow_arg(d, 6, "--workers=2")),
    "k8s secret key literal": lambda: _k8s(lambda d: [e.pop("valueFrom") and e.update(value="$(X)") for e in
                                                      _mlflow_container(d)["env"]
                                                      if e["name"] == "MLFLOW_FLASK_SERVER_SECRET_KEY"]),
    "k8s no mlflow policy": lambda: _k8s(lambda d: d.remove(_policy(d, "mlflow"))),
    "k8s mlflow open to all": lambda: _k8s(lambda d: _policy(d, "mlflow")["spec"]["ingress"].append({})),
    "k8s mlflow policy other pods": lambda: _k8s(lambda d: _policy(d, "mlflow")["spec"]["ingress"][0]["from"].append(
        {"podSelector": {}})),
    "k8s postgres open": lambda: _k8s(lambda d: _policy(d, "mlflow-postgres")["spec"].update(ingress=[{}])),
    "ray head open port": lambda: _ray_policy(lambda d: _policy(d, "cleansweep-ray-head")["spec"]["ingress"][1][
        "ports"].append({"port": 52365})),
    "ray head open to all": lambda: _ray_policy(lambda d: _policy(d, "cleansweep-ray-head")["spec"]["ingress"].append(
        {"from": [{"namespaceSelector": {}}]})),
    "ray head wrong pods": lambda: _ray_policy(lambda d: _policy(d, "cleansweep-ray-head")["spec"].update(
        podSelector={"matchLabels": {"app": "ray"}})),
    "ray workers no policy": lambda: _ray_policy(lambda d: d.remove(_policy(d, "cleansweep-ray-workers"))),
    "ray pod unlabelled": lambda: ray_networkpolicy_problems(
        load_docs(KUBERAY / "networkpolicy.yaml"),
        [_set(load_one(KUBERAY / "raycluster.yaml"), "spec.workerGroupSpecs.0.template.metadata.labels", {})]),
    "env example value": lambda: env_example_problems("POSTGRES_PASSWORD=hunter2\n"),
    "compose env list literal": lambda: _compose("services.postgres.environment", ["POSTGRES_PASSWORD=hunter2"]),
    "k8s embedded secret": lambda: _k8s(lambda d: d.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"password": "x"}})),
    "k8s literal password env": lambda: _k8s(lambda d: _mlflow_env(d, "MLFLOW_AUTH_ADMIN_PASSWORD", "admin")),
    "k8s NodePort": lambda: _k8s(lambda d: d[0]["spec"].update(type="NodePort")),
    "k8s host not allowed": lambda: _k8s(lambda d: [dep["spec"]["template"]["spec"]["containers"][0].update(
        args=[a if not a.startswith("--allowed-hosts") else "--allowed-hosts=localhost:5000" for a in
              dep["spec"]["template"]["spec"]["containers"][0]["args"]]) for dep in d if dep["kind"] == "Deployment"]),
}


@pytest.mark.parametrize("name", BROKEN)
def test_check_catches_broken_input(name):
    assert BROKEN[name](), f"the check did not notice: {name}"


@pytest.mark.parametrize("dotted, value", [
    ("spec.authOption", {"mode": "token"}),                                     # typo'd field: strict schema
    ("spec.workerGroupSpecs.0.minReplicas", "two"),                             # wrong type
    ("spec.authOptions.mode", "password"),                                      # not in the CRD's enum
    ("spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", "2 cores"),  # quantity pattern
    ("spec.headGroupSpec.template", _DELETE),                                   # required by the CRD
    ("spec.workerGroupSpecs.0.groupName", _DELETE),
])
def test_crd_schema_catches_broken_raycluster(dotted, value, crd_validators):
    doc = _set(load_one(KUBERAY / "raycluster.yaml"), dotted, value)
    assert schema_problems(doc, crd_validators)


def test_crd_schema_catches_broken_rayjob(crd_validators):
    doc = _set(load_one(KUBERAY / "rayjob-search.yaml"), "spec.shutdownAfterJobFinishes", "yes")
    assert schema_problems(doc, crd_validators)
    assert schema_problems(_set(doc, "spec.entrypont", "x"), crd_validators)


@pytest.mark.integration
def test_the_backend_uri_without_password_logs_in_with_pgpassword():
    """The shipped URIs carry no password; libpq takes it from PGPASSWORD, which the manifests set from the Secret /
    .env. Checked on a real PostgreSQL (tests/pg_server.py) with the engine mlflow builds from the URI."""
    import subprocess
    import sys
    import tempfile

    from pg_server import start, stop

    uris = {where: _flags(args)["--backend-store-uri"] for where, args in _server_commands().items()}
    for uri in uris.values():
        parsed = urlparse(uri)
        assert parsed.scheme == "postgresql" and parsed.username == "mlflow" and parsed.password is None, uri
    root = Path(tempfile.mkdtemp(prefix="cleansweep-pg-"))
    try:
        server = start(root)
        # The shipped URI with this server's user, host and port (the manifests' are `mlflow@postgres:5432`).
        uri = urlparse(uris["k8s"])._replace(netloc=f"cleansweep@127.0.0.1:{server.port}").geturl()
        probe = ("import sys; from mlflow.store.db.utils import create_sqlalchemy_engine; import sqlalchemy; "
                 "e = create_sqlalchemy_engine(sys.argv[1]); c = e.connect(); "
                 "print(c.execute(sqlalchemy.text('select current_user')).scalar())")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        ok = subprocess.run([sys.executable, "-c", probe, uri], env={**env, "PGPASSWORD": server.password},
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and ok.stdout.strip() == "cleansweep", ok.stderr[-2000:]
        refused = subprocess.run([sys.executable, "-c", probe, uri], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "password" in refused.stderr  # the password came from PGPASSWORD
    finally:
        stop(root)
