"""The cluster definitions parse and have the shape that matters: a RayCluster with a head, a CPU
and a GPU worker group; a `ray up` config Ray's own validator accepts; a runtime_env that ships the
checkout; a submit script that wraps `ray job submit` around `distill run`. Cheap: no cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_raycluster_has_head_cpu_and_gpu_groups():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()))
    (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    import ray

    assert rc["spec"]["rayVersion"] == ray.__version__, "the manifest's Ray must match the Ray distill is tested with"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = _containers(groups["gpu-workers"]["template"])[0]
    n_gpus = gpu["resources"]["limits"]["nvidia.com/gpu"]
    assert int(n_gpus) >= 1 and gpu["resources"]["requests"]["nvidia.com/gpu"] == n_gpus
    assert groups["gpu-workers"]["rayStartParams"]["num-gpus"] == n_gpus
    cpu = _containers(groups["cpu-workers"]["template"])[0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]

    pods = [head["template"], *(g["template"] for g in groups.values())]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for pod in pods:
        c = _containers(pod)[0]
        assert "distill" in c["image"]
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], "the token comes from a Secret, not the file"
        assert "/mnt/cluster" in {m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] in claims
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_ray_up_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_types = [t for name, t in types.items() if name != raw["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu_types and cpu_types
    assert "distill" in raw["docker"]["image"]
    starts = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert any("distill" in c for c in raw["setup_commands"])


def test_runtime_env_ships_the_checkout_and_light_deps():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert "runs/" in env["excludes"]
    packages = env["pip"]["packages"]
    declared = (REPO / "pyproject.toml").read_text()
    for req in packages:
        name = req.split("[")[0].split(">")[0].split("=")[0]
        assert f'"{name}' in declared, f"{req} is not a dependency in pyproject.toml"
    assert not any(p.startswith(("torch", "deepspeed", "vllm", "flash-attn")) for p in packages), \
        "heavy GPU packages belong in the image, not in per-job pip installs"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own schema check of every field


def _fake_ray(tmp_path: Path) -> dict:
    """A `ray` on PATH that prints its arguments, one per line, to see what submit.sh runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ray"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_submit_sh_wraps_ray_job_submit_around_distill_run(tmp_path):
    env = _fake_ray(tmp_path)
    out = subprocess.run([str(CLUSTER / "submit.sh"), "--no-wait", "--submission-id", "x1", "--",
                          "configs/quickstart.yaml", "generate.n_samples=8"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    sep = args.index("--")
    assert args[:2] == ["job", "submit"]
    assert {"--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--no-wait", "--submission-id",
            "x1"} <= set(args[:sep])
    assert args[sep + 1:] == ["python", "-m", "distill.cli", "run", "configs/quickstart.yaml", "generate.n_samples=8"]

    plain = subprocess.run([str(CLUSTER / "submit.sh"), "configs/quickstart.yaml"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=30)
    assert plain.returncode == 0 and plain.stdout.splitlines()[-5:] == [
        "python", "-m", "distill.cli", "run", "configs/quickstart.yaml"]
    missing = subprocess.run([str(CLUSTER / "submit.sh"), "configs/nope.yaml"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "configs/nope.yaml not found" in missing.stderr


def test_readme_commands_in_the_cluster_files_name_real_recipes():
    for name in ("kuberay.yaml", "ray-up.yaml"):
        text = (CLUSTER / name).read_text()
        for recipe in {w for w in text.split() if w.startswith("configs/") and w.endswith(".yaml")}:
            assert (REPO / recipe).is_file(), f"{name} names {recipe}, which does not exist"
