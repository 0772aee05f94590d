"""infra/: each file parsed and checked against what the project really has (no cloud, no Kubernetes, no Docker here)."""
from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.layout import project_packages

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def env_defaults() -> dict[str, str]:
    from flows import env

    return dict(env._DEFAULTS)


def requirement_pin(name: str) -> str:
    """The `name==X` line of requirements.txt."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if re.fullmatch(rf"{re.escape(name)}\s*==\s*\S+", line):
            return line.replace(" ", "")
    raise AssertionError(f"requirements.txt pins no {name}")


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` in shell command strings (split at `&&`, `;`, `||`, `|`)."""
    out = []
    for cmd in commands:
        lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        part: list[str] = []
        for tok in list(lex) + [";"]:
            if tok and set(tok) <= set("&;|()"):
                for i, w in enumerate(part):
                    if (w == "pip" or w.endswith("/pip")) and part[i + 1:i + 2] == ["install"]:
                        out.append(part[i + 2:])
                        break
                part = []
            else:
                part.append(tok)
    return out


def install_order(installs: list[list[str]]) -> list[str]:
    """Each pip install classified as torch / requirements / nodeps / project, in order."""
    kinds = []
    for args in installs:
        reqs = [args[i + 1] for i, a in enumerate(args) if a == "-r"]
        nodeps = "--no-deps" in args
        if any(a == requirement_pin("torch") for a in args) and not reqs:
            kinds.append("torch")
        elif reqs and not nodeps:
            kinds.append("requirements")
        elif reqs and nodeps:
            kinds.append("nodeps")
        elif nodeps and ("." in args or any(a.endswith(".whl") for a in args)):
            kinds.append("project")
        else:
            kinds.append("other")
    return kinds


MAKEFILE_ORDER = ["torch", "requirements", "nodeps", "project"]


def test_makefile_install_order_is_what_infra_follows():
    lines = [l.replace("$(PIP)", "pip") for l in (ROOT / "Makefile").read_text().splitlines() if "$(PIP) install" in l]
    installs = pip_installs(lines)
    assert [k for k in install_order(installs) if k != "other"] == MAKEFILE_ORDER
    assert {a for args in installs for i, a in enumerate(args) if i and args[i - 1] == "-r"} == {
        "requirements.txt", "requirements-dev.txt", "requirements-nodeps.txt"}


# --------------------------------------------------------------------------- Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_the_repo_requirement_files_in_makefile_order(name):
    steps = dockerfile_instructions(INFRA / name)
    assert steps[0][0] == "FROM"
    base = steps[0][1]
    if name.endswith(".cuda"):
        assert base.startswith("nvidia/cuda:") and "runtime" in base
    else:
        assert base.startswith("python:3.11")
    copied: set[str] = set()
    runs = []
    for instr, args in steps:
        if instr == "COPY":
            srcs = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for s in srcs:
                assert (ROOT / s).exists(), f"{name}: COPY {s}: no such file in the repository"
            copied |= set(srcs)
        elif instr == "RUN":
            for args_ in pip_installs([args]):
                reqs = [args_[i + 1] for i, a in enumerate(args_) if a == "-r"]
                for r in reqs:
                    assert (ROOT / r).is_file(), f"{name}: pip install -r {r}: not a file in the repository"
                    assert r in copied, f"{name}: pip install -r {r} before COPY {r}"
                if "-e" in args_ or "." in args_:
                    assert "pyproject.toml" in copied, f"{name}: installs the project before COPY pyproject.toml"
                runs.append(args_)
    assert {"requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt"} <= copied
    assert [k for k in install_order(runs) if k != "other"] == MAKEFILE_ORDER, install_order(runs)
    torch = runs[install_order(runs).index("torch")]
    assert requirement_pin("torch") == "torch==2.13.0" and "torch==2.13.0" in torch
    nodeps = runs[install_order(runs).index("nodeps")]
    assert "requirements-nodeps.txt" in nodeps
    for pkg in project_packages():
        assert pkg in copied or f"{pkg}/" in " ".join(copied), f"{name}: the {pkg} package is not copied"
    # flows/env.py's defaults are baked into the image's environment (PREFECT_HOME: a path inside the image)
    env_text = " ".join(args for instr, args in steps if instr == "ENV")
    for k, v in env_defaults().items():
        assert re.search(rf"\b{k}=", env_text), f"{name}: ENV lacks {k}"
        if k != "PREFECT_HOME":
            assert re.search(rf"\b{k}={re.escape(v)}(\s|$)", env_text), f"{name}: {k} is not {v}"
    ignore = INFRA / f"{name}.dockerignore"
    assert ignore.is_file() and ".venv" in ignore.read_text().split()


def test_infra_readme_says_docker_cannot_run_here():
    text = (INFRA / "README.md").read_text()
    assert "docker build -f infra/Dockerfile" in text and "Docker" in text and "not" in text


# --------------------------------------------------------------------------- KubeRay

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kuberay_raycluster_has_head_cpu_and_gpu_groups():
    docs = _docs(INFRA / "kuberay" / "raycluster.yaml")
    rc = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(rc) == 1 and rc[0]["apiVersion"] == "ray.io/v1"
    spec = rc[0]["spec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) >= 2
    gpu = [g for g in groups.values()
           if any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in g["template"]["spec"]["containers"])]
    cpu = [g for g in groups.values() if g not in gpu]
    assert gpu and cpu, "needs a CPU worker group and a GPU worker group (nvidia.com/gpu limits)"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values must be strings"

    pvcs = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    defaults = env_defaults()
    for group, is_gpu in [(head, False)] + [(g, False) for g in cpu] + [(g, True) for g in gpu]:
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            assert c["image"].endswith("-cuda" if is_gpu else "-cpu"), c["image"]
            env = {e["name"]: e["value"] for e in c["env"]}
            assert set(defaults) <= set(env), f"{c['name']}: missing env {set(defaults) - set(env)}"
            assert {k: env[k] for k in defaults if k != "PREFECT_HOME"} == {
                k: v for k, v in defaults.items() if k != "PREFECT_HOME"}
            assert env["PREFECT_HOME"].startswith("/data/")
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data", "/dev/shm"}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims and claims <= pvcs, "every pod mounts the shared data volume the file declares"
    assert {"ReadWriteMany"} == set(next(d for d in docs if d.get("kind") == "PersistentVolumeClaim")["spec"]["accessModes"])


# --------------------------------------------------------------------------- Ray cluster launcher

def test_ray_cluster_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray

    cfg = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] in ("aws", "gcp", "azure")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values()), "no GPU node type"
    assert any(t.get("max_workers", 0) > 0 and not t.get("resources", {}).get("GPU") for t in types.values())
    setup = cfg["setup_commands"]
    installs = pip_installs(setup)
    assert [k for k in install_order(installs) if k != "other"] == MAKEFILE_ORDER
    for args in installs:
        for i, a in enumerate(args):
            if a == "-r":
                assert (ROOT / args[i + 1]).is_file(), args[i + 1]
    assert any(dst.endswith("pairforge") and src == "." for dst, src in cfg["file_mounts"].items())
    env_line = next(c for c in setup if "pairforge.env" in c and "printf" in c)
    for k, v in env_defaults().items():
        if k != "PREFECT_HOME":
            assert f"{k}={v}" in env_line, k
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "pairforge.env" in cmd


# --------------------------------------------------------------------------- Prefect

def test_prefect_yaml_deployments_point_at_a_real_flow_with_a_cron_schedule():
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    cfg = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    import prefect

    assert cfg["prefect-version"] == prefect.__version__
    assert cfg["deployments"]
    for dep in cfg["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        assert (ROOT / path).is_file(), dep["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert isinstance(flow, Flow)
        assert set(dep["parameters"]) <= set(flow.parameters.properties), "parameters the flow does not take"
        assert dep["work_pool"]["name"]
        crons = [s["cron"] for s in dep["schedules"] if "cron" in s]
        assert crons
        for c in crons:
            CronSchedule(cron=c)  # raises on a bad expression
    readme = (INFRA / "prefect" / "README.md").read_text()
    for needle in ("prefect deploy --prefect-file infra/prefect/prefect.yaml", "prefect worker start --pool",
                   "prefect work-pool create", "pairforge serve"):
        assert needle in readme
    pools = {d["work_pool"]["name"] for d in cfg["deployments"]}
    assert all(f"prefect work-pool create {p} --type process" in readme for p in pools)


@pytest.mark.slow
def test_prefect_deploy_accepts_the_file(tmp_path):
    """`prefect deploy --prefect-file infra/prefect/prefect.yaml --all` against a real local server."""
    import os
    import subprocess
    import sys

    import httpx

    from flows.serve import LocalPrefectServer

    cfg = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    prefect = [sys.executable, "-m", "prefect"]
    with LocalPrefectServer(tmp_path / "prefect") as srv:
        env = os.environ | {"PREFECT_API_URL": srv.api_url, "PREFECT_HOME": str(tmp_path / "prefect")}
        for dep in cfg["deployments"]:
            r = subprocess.run(prefect + ["work-pool", "create", dep["work_pool"]["name"], "--type", "process"],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        r = subprocess.run(prefect + ["deploy", "--prefect-file", "infra/prefect/prefect.yaml", "--all", "--no-prompt"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        got = httpx.post(f"{srv.api_url}/deployments/filter", json={}, timeout=30).json()
    by_name = {d["name"]: d for d in got}
    for dep in cfg["deployments"]:
        d = by_name[dep["name"]]
        assert d["entrypoint"] == dep["entrypoint"] and d["work_pool_name"] == dep["work_pool"]["name"]
        assert [s["schedule"]["cron"] for s in d["schedules"]] == [s["cron"] for s in dep["schedules"]]
        assert d["parameters"] == dep["parameters"]
        assert any(step.get("prefect.deployments.steps.set_working_directory", {}).get("directory") == str(ROOT)
                   for step in d["pull_steps"] or []), d["pull_steps"]
