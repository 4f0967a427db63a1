"""COCO evaluation: ground truth as predictions scores 1.0, perturbed boxes less, 2 DDP ranks == 1 rank.

The first test runs the whole `DetectionModule` validation path (data module, rescaling of boxes
to the original image, `CocoEvaluator`, Lightning logging) with a detector that answers with
the ground truth; the DDP test runs `CocoEvaluator` in 2 real processes over gloo.
"""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.coco_eval import COCO_METRICS, CocoEvaluator, coco_evaluate


def _detections_from_gt(record: dict[str, Any], category_ids: list[int], scale: float = 1.0, jitter: float = 0.0,
                        rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """The non-crowd ground truth of an image as detector output (xyxy, labels 1..K), optionally moved."""
    rng = rng or random.Random(0)
    boxes, labels = [], []
    for a in record["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        dx, dy = rng.uniform(-jitter, jitter) * w, rng.uniform(-jitter, jitter) * h
        boxes.append([(x + dx) * scale, (y + dy) * scale, (x + dx + w) * scale, (y + dy + h) * scale])
        labels.append(category_ids.index(a["category_id"]) + 1)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(boxes)), "labels": torch.tensor(labels, dtype=torch.int64)}


def _val_records(shards: Path) -> list[dict[str, Any]]:
    import webdataset as wds

    from pipeline.data.coco_wds import read_coco_manifest

    manifest = read_coco_manifest(shards)
    urls = [str(shards / s.name) for s in manifest.split("val2017").shards]
    return [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.data.coco_wds import convert_coco_to_wds
    from pipeline.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    # 80x80 images fed at 64: predictions must be scaled back to the original pixels to score 1.0.
    write_shapes(root / "raw", num_train=8, num_val=24, size=80, seed=3)
    convert_coco_to_wds(root / "raw", root / "wds", shard_size=10)
    return root / "wds"


def test_ground_truth_as_predictions_scores_one_through_the_module(shapes_shards: Path, tmp_path: Path) -> None:
    import lightning as L

    from condconv import ModelSpec
    from pipeline.data.detection_datamodule import DetectionDataModule
    from pipeline.detection import DetectionModule

    size = 64

    class GroundTruthDetector(DetectionModule):
        """Answers every image with its own ground truth, in input pixels (as the SSD does)."""

        def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self._records = batch[2]

        def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            ids = [c["id"] for c in self.trainer.datamodule.categories]
            return [_detections_from_gt(r, ids, scale=size / r["width"]) for r in self._records]

    dm = DetectionDataModule(str(shapes_shards), batch_size=5, num_workers=0, image_size=size)
    module = GroundTruthDetector(ModelSpec(arch="mobilenet_v1", width_mult=0.25, resolution=size, num_classes=3))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val_map"] == pytest.approx(1.0)
    assert metrics["val_map_50"] == pytest.approx(1.0) and metrics["val_map_75"] == pytest.approx(1.0)
    assert metrics["val_map_large"] == -1.0  # no object above 96x96 pixels in 80x80 images (COCO's -1)


def test_perturbed_boxes_score_lower_and_false_positives_cost(shapes_shards: Path) -> None:
    records = _val_records(shapes_shards)
    ids = [1, 3, 7]
    categories = [{"id": i, "name": str(i)} for i in ids]
    scores = {}
    for jitter in (0.0, 0.1, 0.3):
        ev = CocoEvaluator(categories)
        rng = random.Random(0)
        ev.update(records, [_detections_from_gt(r, ids, jitter=jitter, rng=rng) for r in records])
        scores[jitter] = ev.compute()
    assert scores[0.0]["map"] == pytest.approx(1.0)
    assert scores[0.0]["map"] > scores[0.1]["map"] > scores[0.3]["map"]
    assert scores[0.1]["map_50"] == pytest.approx(1.0)  # 10% shifts keep IoU > 0.5
    # Wrong class on every box: nothing is matched.
    ev = CocoEvaluator(categories)
    swapped = [_detections_from_gt(r, ids) for r in records]
    for d in swapped:
        d["labels"] = d["labels"] % 3 + 1
    ev.update(records, swapped)
    assert ev.compute()["map"] == 0.0
    # No detections at all: 0, not an error.
    assert coco_evaluate(records, [], categories)["map"] == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, records: list[dict], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ids = [1, 3, 7]
        rng = random.Random(0)
        dets = [_detections_from_gt(r, ids, jitter=0.2, rng=rng) for r in records]
        # Uneven shares, and the last image on both ranks (as a padded sampler would do): counted once.
        mine = [i for i in range(len(records)) if (i % 3 == 0) == (rank == 0)] + [len(records) - 1]
        ev = CocoEvaluator([{"id": i, "name": str(i)} for i in ids])
        ev.update([records[i] for i in mine], [dets[i] for i in mine])
        Path(out, f"rank{rank}.json").write_text(json.dumps(ev.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_evaluation_on_two_ranks_equals_one(shapes_shards: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    records = _val_records(shapes_shards)
    rng = random.Random(0)
    ev = CocoEvaluator([{"id": i, "name": str(i)} for i in (1, 3, 7)])
    ev.update(records, [_detections_from_gt(r, [1, 3, 7], jitter=0.2, rng=rng) for r in records])
    single = ev.compute()
    assert 0.0 < single["map"] < 1.0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, _free_port(), records, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert got == pytest.approx(single), f"rank {rank}"
        assert set(got) == set(COCO_METRICS)
