"""Issue 9, item 7: checkpoints load as data only, local servers listen on loopback, no credentials in the repo,
``pipe:`` shard locations are announced as the commands they are.

Source scans parse Python with `ast` (not regexes over text) where they look for calls, and each
scanner first proves on planted text that it would catch what it looks for.
"""
from __future__ import annotations

import ast
import logging
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_clusters import SECRET_PATTERNS

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("condconv", "pipeline", "scripts", "bench", "tests")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _python_files(dirs=CODE_DIRS) -> list[Path]:
    return sorted(p for d in dirs if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


# --------------------------------------------------------------------------- torch.load
def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


# A test that asks for an unsafe load on purpose (to show it is refused) marks the line with this.
PRAGMA = "# unsafe on purpose: must be refused"


def unsafe_loads(source: str) -> list[int]:
    """Line numbers of ``torch.load(...)`` / ``*.load_from_checkpoint(...)`` calls without ``weights_only=True``,
    and of any ``weights_only=False``."""
    lines = []
    text_lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or PRAGMA in text_lines[node.lineno - 1]:
            continue
        flag = _kw(node, "weights_only")
        if isinstance(flag, ast.Constant) and flag.value is False:
            lines.append(node.lineno)
            continue
        func = node.func
        is_torch_load = (isinstance(func, ast.Attribute) and func.attr == "load"
                         and isinstance(func.value, ast.Name) and func.value.id == "torch")
        is_ckpt_load = isinstance(func, ast.Attribute) and func.attr == "load_from_checkpoint"
        if (is_torch_load or is_ckpt_load) and not (isinstance(flag, ast.Constant) and flag.value is True):
            lines.append(node.lineno)
    return lines


def test_unsafe_load_scanner_catches_planted_calls():
    planted = "import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\nM.load_from_checkpoint(p)\n" \
              "x = f(weights_only=False)\ntorch.load(p, map_location='cpu', weights_only=True)\n" \
              f"torch.load(p, weights_only=False)  {PRAGMA}\n"
    assert unsafe_loads(planted) == [2, 3, 4, 5]


def test_every_torch_load_in_the_repo_is_weights_only():
    offenders = {}
    for path in _python_files():
        lines = unsafe_loads(path.read_text())
        if lines and path.name != Path(__file__).name:  # this file plants calls (as strings) above
            offenders[str(path.relative_to(REPO))] = lines
    assert offenders == {}


# --------------------------------------------------------------------------- loopback
_HOST_RE = re.compile(r"(?:--host[= ]+|--dashboard[-_]host[= ]+|dashboard[-_]host\s*[:=]\s*|\bhost\s*=\s*)"
                      r"[\"']?([\w.:\[\]-]+)")
# Servers meant for a cluster's private network, each with the docs' reason (not for a laptop).
CLUSTER_NETWORK = {
    ("docs/clusters.md", "--artifacts-destination s3://my-bucket/mlflow --host 0.0.0.0"):
        "the shared MLflow server every node reaches, documented as inside the cluster network only",
}


def non_loopback_hosts(text: str) -> list[str]:
    """Host values of ``--host``, ``dashboard_host`` and ``host=`` settings that are not loopback."""
    return [m.group(1) for m in _HOST_RE.finditer(text) if m.group(1) not in LOOPBACK]


def test_loopback_scanner_catches_planted_hosts():
    assert non_loopback_hosts("mlflow ui --host 0.0.0.0 --port 5000") == ["0.0.0.0"]
    assert non_loopback_hosts("ray.init(dashboard_host='0.0.0.0')") == ["0.0.0.0"]
    assert non_loopback_hosts("serve(host=\"10.0.0.5\")") == ["10.0.0.5"]
    assert non_loopback_hosts("mlflow ui --host 127.0.0.1; ray start --dashboard-host=localhost") == []


def test_servers_started_on_a_users_machine_listen_on_loopback():
    files = [*_python_files(("pipeline", "scripts", "bench", "condconv")), REPO / "README.md", REPO / "Makefile",
             *sorted((REPO / "docs").glob("*.md"))]
    offenders = []
    for path in files:
        if not path.is_file():
            continue
        rel = str(path.relative_to(REPO))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if non_loopback_hosts(line) and not any(f == rel and s in line for f, s in CLUSTER_NETWORK):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


def test_local_ray_cluster_starts_without_a_public_dashboard():
    """Every ``ray.init`` that starts a cluster (no address) disables the dashboard or binds it to loopback."""
    source = (REPO / "pipeline" / "sweep.py").read_text()
    starts = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
              and _kw(node, "address") is None]
    assert starts, "the sweep starts no local Ray cluster any more? update this test"
    for call in starts:
        dashboard, host = _kw(call, "include_dashboard"), _kw(call, "dashboard_host")
        off = isinstance(dashboard, ast.Constant) and dashboard.value is False
        loopback = isinstance(host, ast.Constant) and host.value in LOOPBACK
        assert off or loopback, f"pipeline/sweep.py:{call.lineno}: ray.init exposes the dashboard"


def test_printed_mlflow_ui_command_binds_loopback():
    from pipeline.sweep_cli import mlflow_ui_command

    command = mlflow_ui_command("sqlite:////tmp/x/mlflow.db")
    assert "--host 127.0.0.1" in command and not non_loopback_hosts(command)


# --------------------------------------------------------------------------- credentials
def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for name in names:
        path = REPO / name
        if not path.is_file() or name.startswith("tests/"):  # tests plant secrets to test the scanner
            continue
        try:
            out.append((path, path.read_text()))
        except UnicodeDecodeError:
            continue
    return out


def test_no_credentials_anywhere_in_the_repository():
    hits = [f"{p.relative_to(REPO)}: {label}" for p, text in _tracked_text_files()
            for label, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    assert hits == []


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_cluster_configs_take_credentials_from_the_users_environment(name):
    config = yaml.safe_load((REPO / "clusters" / name).read_text())
    key = (config.get("auth") or {}).get("ssh_private_key")
    # A key path on the user's machine (home or absolute), never a file shipped with the repo.
    assert key is None or str(key).startswith(("~", "/")), key
    assert set((config.get("file_mounts") or {}).values()) <= {"."}  # only the repo, no credential files
    provider = config.get("provider") or {}
    assert not {k for k in provider if re.search(r"key|secret|token|password|credential", k, re.I)}


def test_rayjob_reads_settings_from_a_configmap_not_inline():
    docs = list(yaml.safe_load_all((REPO / "clusters" / "kuberay-rayjob.yaml").read_text()))
    text = yaml.safe_dump_all(docs)
    assert "configMapRef" in text
    assert not re.search(r"(?i)(password|secret_access_key|token)\s*:\s*\S", text)


# --------------------------------------------------------------------------- pipe:
def test_pipe_locations_are_announced_as_shell_commands(digits_shards, caplog):
    from pipeline.data import ShardDataModule

    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_datamodule"):
        dm = ShardDataModule(f"pipe:cat {digits_shards}/{{}}", num_workers=0)
    assert dm.num_classes == 10  # the command really ran (it read the manifest)
    (record,) = [r for r in caplog.records if "pipe:" in r.getMessage()]
    assert "shell command" in record.getMessage() and f"cat {digits_shards}" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_datamodule"):
        ShardDataModule(str(digits_shards), num_workers=0)
    assert not [r for r in caplog.records if "pipe:" in r.getMessage()]
    docs = (REPO / "docs" / "data.md").read_text()
    assert "**`pipe:` runs a shell command**" in docs and "only use" in docs.lower()
