"""Real 2-process Lightning DDP (CPU, gloo) over shards that do not divide by ranks x workers.

Checks that training finishes (no hang on uneven batches), that both ranks run the same number
of train batches every epoch, and that validation sees every val sample exactly once across ranks.
The training script runs in a subprocess (Lightning's DDP launcher re-executes the script for
rank 1), in its own process group so a hang is killed at the timeout instead of blocking CI.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.data.imagenet_wds import convert_imagenet_to_wds
from tests.test_data_convert import make_indexed_folder

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from pipeline.data import ShardDataModule
    from tests.test_data_convert import pixel_ids

    data_dir, out_dir = sys.argv[1], sys.argv[2]


    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 4)
            self.record = {"train_batches": {}, "val": {}}

        def training_step(self, batch, batch_idx):
            images, labels = batch
            counts = self.record["train_batches"]
            counts[self.current_epoch] = counts.get(self.current_epoch, 0) + 1
            return torch.nn.functional.cross_entropy(self.fc(images.flatten(1)), labels)

        def validation_step(self, batch, batch_idx):
            images, labels = batch
            loss = torch.nn.functional.cross_entropy(self.fc(images.flatten(1)), labels)
            # Synced at epoch end only, so uneven val batch counts across ranks are fine.
            self.log("val_loss", loss, sync_dist=True)
            seen = self.record["val"].setdefault(self.current_epoch, [])
            seen += [[i, y] for i, y in zip(pixel_ids(images), labels.tolist())]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    dm = ShardDataModule(data_dir, batch_size=4, num_workers=2, image_size=8, val_resize=8, shuffle_buffer=8)
    model = Tiny()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    model.record["skipped"] = dm.skipped_samples
    with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(model.record, f)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_ddp_two_ranks_equal_train_batches_and_exactly_once_val(tmp_path):
    # 30 train samples in 3 shards for 2 ranks x 2 workers = 4 readers (3 batches of 4 per rank);
    # 26 val samples in 3 shards (10, 10, 6): one whole shard per rank + one split by position.
    make_indexed_folder(tmp_path / "src", n_classes=2, n_train=15, n_val=13)
    convert_imagenet_to_wds(tmp_path / "src", tmp_path / "wds", shard_size=10, progress=False)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "wds"), str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: rank 1 and the DataLoader workers too
        output, _ = proc.communicate()
        pytest.fail(f"DDP run hung for {TIMEOUT_S}s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected_batches = 30 // (2 * 4)
    for epoch in ("0", "1"):
        assert [r["train_batches"][epoch] for r in ranks] == [expected_batches, expected_batches]
        pairs = sorted(p for r in ranks for p in r["val"][epoch])
        assert [i for i, _ in pairs] == list(range(10000, 10026))  # each val sample exactly once
        assert all(label == (i - 10000) // 13 for i, label in pairs)
    assert [r["skipped"] for r in ranks] == [0, 0]
