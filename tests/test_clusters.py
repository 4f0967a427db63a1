"""The cluster configs in clusters/ against Ray's own launcher schema, KubeRay's RayJob shape and secrets."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml", "local.yaml")
CLOUD_CONFIGS = ("aws.yaml", "gcp.yaml")
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
DOCS = ROOT / "docs" / "clusters.md"

# Things that must never be committed: cloud keys, private keys, service-account key files.
SECRET_PATTERNS = {
    "AWS secret key setting": re.compile(r"aws_secret_access_key|AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S", re.I),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GCP service-account key": re.compile(r"\"private_key(_id)?\"\s*:|\"type\"\s*:\s*\"service_account\""),
    "password/token value": re.compile(r"(password|passwd|api_key|secret_key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{12,}", re.I),
}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def pinned_ray_version() -> str:
    match = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_all_cluster_yamls_parse():
    files = sorted(CLUSTERS.glob("*.yaml"))
    assert {f.name for f in files} >= {*LAUNCHER_CONFIGS, RAYJOB.name}
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f.name


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_valid_for_ray(name, ray_schema):
    """What `ray up` does first: Ray's JSON schema, then its own prepare + validate steps."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, ray_schema)
    for key in ("cluster_name", "provider", "auth", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert config.get(key), f"{name}: missing {key}"
    prepared = prepare_config(config)
    validate_config(prepared)  # head type exists, min_workers fit max_workers, ...
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_configs_have_head_and_gpu_workers(name):
    config = load(name)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types and types[head]["resources"].get("CPU") == 0  # no training on the head
    workers = {k: v for k, v in types.items() if k != head}
    assert workers and all(v.get("max_workers", 0) > 0 for v in workers.values())
    if config["provider"]["type"] == "aws":
        gpu_families = ("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p4de.", "p5.")
        instance_types = [v["node_config"]["InstanceType"] for v in workers.values()]
        assert all(t.startswith(gpu_families) for t in instance_types), instance_types
        assert {"g5", "p4d"} <= {t.split(".")[0] for t in instance_types}
        assert all("IamInstanceProfile" in v["node_config"] for v in workers.values())  # S3 via profile
    else:
        assert config["provider"]["type"] == "gcp"
        assert all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
        machine_types = {v["node_config"]["machineType"] for v in workers.values()}
        accelerators = {a["acceleratorType"] for v in workers.values() for a in v["node_config"].get("guestAccelerators", [])}
        assert any(m.startswith("a2-") for m in machine_types) and "nvidia-tesla-t4" in accelerators
        assert all(v["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE" for v in workers.values())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_syncs_and_installs_repo_with_constraints(name):
    config = load(name)
    assert config["file_mounts"] == {"~/condconv": "."}
    installs = [c for c in config["setup_commands"] if "pip install" in c and "-c constraints.txt" in c]
    assert len(installs) == 1 and "cd ~/condconv" in installs[0], config["setup_commands"]
    assert ".gitignore" in config.get("rsync_filter", [])  # never ship .venv, data, mlruns


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_image_matches_pinned_ray(name):
    image = load(name)["docker"]["image"]
    assert image == f"rayproject/ray:{pinned_ray_version()}-py311-gpu"


def test_local_config_is_on_prem():
    config = load("local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and isinstance(provider["worker_ips"], list)
    # Ray refuses node types in a local config (it builds the single type itself).
    assert "available_node_types" not in config and "head_node_type" not in config
    text = (CLUSTERS / "local.yaml").read_text()
    assert text.count("REPLACE") >= 3  # head_ip, worker_ips and auth are flagged for editing


def test_rayjob_manifest():
    (job,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert "condconv sweep tasks/sweeps/" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned_ray_version()
    head_containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head_containers[0]["image"]
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups and all(g["groupName"] and g["maxReplicas"] >= 1 for g in gpu_groups)
    # Every Ray container gets the tracking URI / storage path from the same ConfigMap.
    for c in head_containers + [c for g in gpu_groups for c in g["template"]["spec"]["containers"]]:
        assert {"configMapRef": {"name": "condconv-config"}} in c.get("envFrom", [])


def test_dockerfile_uses_pinned_ray_and_constraints():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned_ray_version()}-py311-gpu" in text
    assert "-c constraints.txt" in text


def _secret_hits(text: str) -> list[str]:
    return [label for label, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_secret_patterns_catch_planted_secrets():
    # The scanner itself must work, or the no-secrets test below proves nothing.
    planted = {
        "aws_secret_access_key = abcd": "AWS secret key setting",
        "key: AKIAABCDEFGHIJKLMNOP": "AWS access key id",
        "-----BEGIN OPENSSH PRIVATE KEY-----": "private key block",
        '{"type": "service_account", "project_id": "x"}': "GCP service-account key",
        "password: hunter2hunter2hunter2": "password/token value",
    }
    for text, label in planted.items():
        assert label in _secret_hits(text), text
    assert _secret_hits("ssh_private_key: ~/.ssh/id_ed25519  # a path, not a key") == []


def test_no_secrets_in_cluster_files_and_docs():
    files = [f for f in CLUSTERS.iterdir() if f.is_file()] + [DOCS]
    for f in files:
        assert _secret_hits(f.read_text()) == [], f.name


def test_docs_cover_launch_submit_and_mlflow():
    text = DOCS.read_text()
    for needle in ("ray up clusters/aws.yaml", "ray up clusters/gcp.yaml", "ray up clusters/local.yaml",
                   "ray submit", "ray job submit", "--working-dir .", "kubectl apply -f clusters/kuberay-rayjob.yaml",
                   "MLFLOW_TRACKING_URI", "CONDCONV_STORAGE_PATH", "mlflow ui", "ssh -L", "ray dashboard"):
        assert needle in text, needle
