"""Real 2-process Lightning DDP (CPU, gloo) over FFCV `.beton` files, selected with `format: ffcv`.

Checks that training finishes, that both ranks run the same number of train batches every epoch
(30 samples do not divide by 2 ranks x batch 4), that the ranks' train shares are disjoint, and that
validation sees every val sample exactly once across ranks. As in test_data_ddp.py the script runs
in its own process group, so a hang is killed at the timeout instead of blocking CI.
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

from pipeline.data.imagenet_ffcv import convert_imagenet_to_ffcv
from tests.test_data_convert import make_indexed_folder

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from pipeline.data.formats import classification_data
    from tests.test_data_convert import pixel_ids

    data_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)


    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 2)
            self.record = {"train": {}, "val": {}}

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.record["train"].setdefault(self.current_epoch, []).append(pixel_ids(images))
            return torch.nn.functional.cross_entropy(self.fc(images.flatten(1)), labels)

        def validation_step(self, batch, batch_idx):
            images, labels = batch
            loss = torch.nn.functional.cross_entropy(self.fc(images.flatten(1)), labels)
            self.log("val_loss", loss, sync_dist=True)  # synced once per epoch: uneven val batches are fine
            seen = self.record["val"].setdefault(self.current_epoch, [])
            seen += [[i, y] for i, y in zip(pixel_ids(images), labels.tolist())]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    dm = classification_data(data_dir, format="ffcv", batch_size=4, num_workers=1, image_size=8, val_resize=8,
                             train_augment="none")
    model = Tiny()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    model.record["type"] = type(dm).__name__
    with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(model.record, f)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_ffcv_ddp_two_ranks_equal_train_batches_and_exactly_once_val(tmp_path):
    # 30 train samples (2 classes x 15) for 2 ranks x batch 4: 3 full batches per rank, 6 samples unused;
    # 26 val samples: 13 per rank (3 full batches + 1 partial).
    make_indexed_folder(tmp_path / "src", n_classes=2, n_train=15, n_val=13)
    convert_imagenet_to_ffcv(tmp_path / "src", tmp_path / "ffcv", progress=False)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ffcv"), str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: rank 1 too
        output, _ = proc.communicate()
        pytest.fail(f"FFCV DDP run hung for {TIMEOUT_S}s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["type"] for r in ranks] == ["FFCVDataModule", "FFCVDataModule"]
    for epoch in ("0", "1"):
        batches = [r["train"][epoch] for r in ranks]
        assert [len(b) for b in batches] == [3, 3]
        assert all(len(batch) == 4 for b in batches for batch in b)
        ids = [i for b in batches for batch in b for i in batch]
        assert len(set(ids)) == 24 and set(ids) <= set(range(30))  # disjoint shares of the train set
        pairs = sorted(p for r in ranks for p in r["val"][epoch])
        assert [i for i, _ in pairs] == list(range(10000, 10026))  # each val sample exactly once
        assert all(label == (i - 10000) // 13 for i, label in pairs)
    assert ranks[0]["train"]["0"] != ranks[0]["train"]["1"]  # reshuffled every epoch
