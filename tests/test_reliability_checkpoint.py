"""Issue 9, items 4 and 7: checkpoints survive a kill mid-write, old ones go only after new ones, loads are data only.

The kill test runs a real `condconv fit` (the demo config on the digits shards) in a subprocess
whose ``torch.save`` writes half of one chosen checkpoint and then stops, as a process does when
it is killed during a slow write; the test then SIGKILLs it. The checkpoint directory must hold
only complete checkpoints under final names, and a rerun with ``--ckpt_path last`` continues
from the last complete epoch.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint import AtomicCheckpointIO, atomic_torch_save
from pipeline.lightning_cli import build_fit, load_config

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "mobilenet_v1-w0.25-e4-paper"  # the demo config's model
TRAIN_BATCHES = 3

# The child: `condconv fit ...` whose PAUSE_NTH-th save of PAUSE_TARGET writes half the bytes and hangs.
SLOW_SAVE_FIT = r"""
import io, os, sys, time, torch
import pipeline.checkpoint as checkpoint
from pipeline.cli import main

target, nth, marker = os.environ["PAUSE_TARGET"], int(os.environ["PAUSE_NTH"]), os.environ["PAUSE_MARKER"]
real_atomic, real_save = checkpoint.atomic_torch_save, torch.save
state = {"seen": 0, "pause": False}

def atomic(obj, path):
    if os.path.basename(str(path)) == target:
        state["seen"] += 1
        state["pause"] = state["seen"] == nth
    return real_atomic(obj, path)

def save(obj, f, *args, **kwargs):
    if not state["pause"]:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os.fsync(f.fileno())
    with open(marker, "w") as m:
        m.write("paused mid-write")
    time.sleep(3600)

checkpoint.atomic_torch_save = atomic
checkpoint.torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def _fit_config(workdir: Path, data_dir: Path, progress: Path) -> Path:
    config = load_config(REPO / "tasks" / "demo" / "fit.yaml")
    config["data"]["data_dir"] = str(data_dir)
    config["mlflow"]["tracking_uri"] = f"sqlite:///{workdir}/mlflow.db"
    # No MLflow logger: its store setup would only slow down the two processes this test starts.
    config["trainer"].update(max_epochs=2, limit_train_batches=TRAIN_BATCHES, limit_val_batches=1, logger=False,
                             num_sanity_val_steps=0, enable_progress_bar=False, callbacks=[
                                 {"class_path": "tests.test_fit_cli.RecordProgress",
                                  "init_args": {"path": str(progress)}}])
    path = workdir / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _loads(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_fit_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, digits_shards):
    import json

    progress = tmp_path / "progress.json"
    config = _fit_config(tmp_path, digits_shards, progress)
    marker = tmp_path / "paused"
    # The 2nd save of last.ckpt is the end of epoch 1: it would replace epoch 0's last.ckpt.
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE_FIT, "fit", "--config", str(config)], cwd=tmp_path,
        env=_env(PAUSE_TARGET="last.ckpt", PAUSE_NTH="2", PAUSE_MARKER=str(marker)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, f"fit ended before the paused save: {child.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the fit never reached the second last.ckpt save"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    ckpt_dir = tmp_path / "outputs" / "checkpoints" / RUN_NAME
    partial = [p for p in ckpt_dir.iterdir() if p.name.startswith(".last.ckpt.") and p.name.endswith(".tmp")]
    assert len(partial) == 1 and not _loads(partial[0])  # the kill did land mid-write
    finals = sorted(ckpt_dir.glob("*.ckpt"))
    assert finals and all(_loads(p) for p in finals), finals  # no partial file under a final name
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, TRAIN_BATCHES)  # epoch 0's, intact

    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", "--config", str(config),
                             "--ckpt_path", "last"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(progress.read_text())
    assert record["start"] == {"epoch": 1, "global_step": TRAIN_BATCHES}  # epoch 0 is not trained again
    assert record["end"] == {"epoch": 2, "global_step": 2 * TRAIN_BATCHES}
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 2 * TRAIN_BATCHES)
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]  # the next complete save cleaned up


class RecordingCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO that records each completed save and each removal, with what was on disk then."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, list[str]]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.events.append(("saved", Path(path).name, sorted(p.name for p in Path(path).parent.glob("*.ckpt"))))

    def remove_checkpoint(self, path) -> None:
        on_disk = sorted(p.name for p in Path(path).parent.glob("*.ckpt"))
        self.events.append(("remove", Path(path).name, on_disk))
        super().remove_checkpoint(path)


def test_keep_last_removes_the_old_checkpoint_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    from tests.test_classification import TINY_SPEC, TinyDataModule

    monkeypatch.chdir(tmp_path)
    io_ = RecordingCheckpointIO()
    config = {
        "seed_everything": 0, "num_threads": 1,
        "model": {"model": dict(TINY_SPEC), "recipe": {"lr": 0.064, "warmup_epochs": 0, "schedule": "constant"}},
        "data": {"num_train": 32, "num_val": 16, "batch_size": 16},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "logger": False},
        # Keep the last k=1 epoch checkpoints (no monitor): each epoch replaces the previous one.
        "checkpoint": {"dirpath": str(tmp_path / "ckpts"), "monitor": None, "filename": "{epoch:03d}",
                       "save_top_k": 1, "save_last": False},
    }
    parts = build_fit(config, plugins=[io_], datamodule_class=TinyDataModule)
    parts.fit()

    removals = [(name, on_disk) for kind, name, on_disk in io_.events if kind == "remove"]
    assert [name for name, _ in removals] == ["epoch=000.ckpt", "epoch=001.ckpt"]
    for old, on_disk in removals:
        newer = f"epoch={int(old[6:9]) + 1:03d}.ckpt"
        # Under its final name only after a complete write and the rename: the new one was in place first.
        assert newer in on_disk, (old, on_disk)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch=002.ckpt"]


def test_stale_temp_files_of_a_killed_save_are_removed_by_the_next_complete_save(tmp_path):
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    other = tmp_path / ".epoch=001.ckpt.xyz.tmp"  # another checkpoint's: not ours to delete
    other.write_bytes(b"x")
    os.utime(other, (time.time() - 60, time.time() - 60))
    atomic_torch_save({"step": 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.ckpt"]


def test_checkpoint_loads_never_unpickle_code(tmp_path, monkeypatch):
    """A checkpoint that would run code when unpickled is refused, even when a caller asks for a full unpickle."""
    from tests.test_classification import TINY_SPEC, TinyDataModule

    monkeypatch.chdir(tmp_path)
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    evil = tmp_path / "evil.ckpt"
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "payload": Payload()}, buffer)
    evil.write_bytes(buffer.getvalue())

    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)  # unsafe on purpose: must be refused
    assert not proof.exists()

    # The Trainer's resume path goes through the CheckpointIO that build_fit / the CLI install.
    config = {"model": {"model": dict(TINY_SPEC)}, "data": {"num_train": 16, "num_val": 16, "batch_size": 16},
              "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "max_epochs": 1}}
    parts = build_fit(config, datamodule_class=TinyDataModule)
    trainer = parts.make_trainer()
    with pytest.raises(ValueError, match="weights_only=False"):
        trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=str(evil), weights_only=False)  # unsafe on purpose: must be refused
    assert not proof.exists()
