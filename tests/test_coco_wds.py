"""`condconv data coco-to-wds`: round trip of a small COCO json, crowd/empty images, clipping, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.coco_wds import convert_coco_to_wds, read_coco_manifest

# Non-contiguous ids, as COCO's.
CATEGORIES = [{"id": 2, "name": "cat", "supercategory": "animal"}, {"id": 5, "name": "dog", "supercategory": "animal"}]


def _coco(root: Path, split: str, images: list[dict], annotations: list[dict], categories=CATEGORIES) -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (im["id"] * 20 % 255, 90, 30)).save(root / split / im["file_name"])
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _small_coco(root: Path) -> None:
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 40, "height": 30} for i in (3, 7, 11, 12)]
    anns = [
        {"id": 1, "image_id": 3, "category_id": 2, "bbox": [1, 2, 10, 8], "area": 80.0, "iscrowd": 0},
        {"id": 2, "image_id": 3, "category_id": 5, "bbox": [20, 5, 10, 10], "area": 100.0, "iscrowd": 0},
        {"id": 9, "image_id": 7, "category_id": 5, "bbox": [30, 20, 20, 20], "area": 400.0, "iscrowd": 0},  # clipped
        {"id": 10, "image_id": 7, "category_id": 2, "bbox": [0, 0, 40, 30], "area": 1200.0, "iscrowd": 1},  # crowd
        {"id": 11, "image_id": 12, "category_id": 2, "bbox": [45, 5, 5, 5], "area": 25.0, "iscrowd": 0},  # outside: dropped
    ]  # image 11 has no annotation: kept, as COCO does
    _coco(root, "val2017", images, anns)
    _coco(root, "train2017", images[:2], anns[:2])


def _read_shards(dst: Path, split: str) -> list[dict]:
    import webdataset as wds

    manifest = read_coco_manifest(dst)
    urls = [str(dst / s.name) for s in manifest.split(split).shards]
    return [json.loads(s["json"]) | {"__has_image__": "jpg" in s}
            for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def test_round_trip_every_image_box_and_category_once(tmp_path: Path) -> None:
    _small_coco(tmp_path / "src")
    manifest = convert_coco_to_wds(tmp_path / "src", tmp_path / "wds", shard_size=2)
    assert manifest.categories == CATEGORIES
    assert manifest.category_ids == [2, 5] and manifest.num_classes == 2
    val = manifest.split("val2017")
    assert (val.num_images, val.num_empty_images, val.num_crowd) == (4, 2, 1)  # image 12 lost its only box
    assert (val.num_clipped_boxes, val.num_dropped_boxes, val.num_annotations) == (1, 1, 4)
    assert val.category_counts == [1, 2]  # non-crowd boxes per category
    assert len(val.shards) == 2
    records = _read_shards(tmp_path / "wds", "val2017")
    assert sorted(r["image_id"] for r in records) == [3, 7, 11, 12]
    assert all(r["__has_image__"] for r in records)
    anns = {a["id"]: a for r in records for a in r["annotations"]}
    assert sorted(a["id"] for r in records for a in r["annotations"]) == [1, 2, 9, 10]
    assert anns[1]["bbox"] == [1, 2, 10, 8] and anns[1]["category_id"] == 2
    assert anns[9]["bbox"] == [30, 20, 10, 10]  # clipped to the 40x30 image
    assert anns[10]["iscrowd"] == 1
    assert [r["image_id"] for r in _read_shards(tmp_path / "wds", "train2017")] in ([3, 7], [7, 3])
    on_disk = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert on_disk["format"] == "condconv-coco-wds/1" and on_disk["num_classes"] == 2


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    _small_coco(tmp_path / "src")
    convert_coco_to_wds(tmp_path / "src", tmp_path / "wds")
    with pytest.raises(ValueError, match="--overwrite"):
        convert_coco_to_wds(tmp_path / "src", tmp_path / "wds")
    convert_coco_to_wds(tmp_path / "src", tmp_path / "wds", overwrite=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("annotations"), r"not a COCO instances json: expected keys \['images', 'annotations', 'categories'\]"),
        (lambda d: d["annotations"][0].update(category_id=4), r"unknown category_id 4; the file defines \[2, 5\]"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id 99"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "expected .*'bbox': \\[x, y, w, h\\]"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 3 appears twice"),
    ],
    ids=["missing-key", "unknown-category", "unknown-image", "bad-bbox", "duplicate-image"],
)
def test_bad_json_is_one_clear_error_before_writing(tmp_path: Path, mutate, message: str) -> None:
    _small_coco(tmp_path / "src")
    path = tmp_path / "src" / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        convert_coco_to_wds(tmp_path / "src", tmp_path / "wds")
    assert not (tmp_path / "wds").exists()


def test_not_json_and_missing_image(tmp_path: Path) -> None:
    _small_coco(tmp_path / "src")
    (tmp_path / "src" / "val2017" / "000011.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000011.jpg"):
        convert_coco_to_wds(tmp_path / "src", tmp_path / "wds")
    (tmp_path / "src" / "annotations" / "instances_val2017.json").write_text("not json {")
    with pytest.raises(ValueError, match="not valid JSON"):
        convert_coco_to_wds(tmp_path / "src", tmp_path / "wds")


def test_cli_prints_one_line_error(tmp_path: Path) -> None:
    _small_coco(tmp_path / "src")
    (tmp_path / "src" / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": []}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "coco-to-wds", str(tmp_path / "src"),
                           str(tmp_path / "wds")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "is not a COCO instances json" in proc.stderr


def test_shapes_convert_and_load_as_ssd_batches(tmp_path: Path) -> None:
    import torch

    from pipeline.data.detection_datamodule import DetectionDataModule
    from pipeline.data.shapes import SHAPE_CATEGORIES, write_shapes

    write_shapes(tmp_path / "raw", num_train=24, num_val=10, size=64, seed=1)
    manifest = convert_coco_to_wds(tmp_path / "raw", tmp_path / "wds", shard_size=8)
    assert manifest.categories == SHAPE_CATEGORIES
    assert manifest.split("train2017").num_images == 24
    dm = DetectionDataModule(str(tmp_path / "wds"), batch_size=4, num_workers=0, image_size=64, shuffle_buffer=8)
    assert (dm.num_classes, dm.num_train, dm.num_val) == (3, 24, 10)
    images, targets, records = next(iter(dm.dataloader("train")))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    for t in targets:
        assert t["boxes"].shape[1] == 4 and t["labels"].shape[0] == t["boxes"].shape[0]
        assert ((t["labels"] >= 1) & (t["labels"] <= 3)).all()
    seen = [r["image_id"] for _, _, recs in dm.dataloader("val") for r in recs]
    assert sorted(seen) == sorted(r["image_id"] for r in _read_shards(tmp_path / "wds", "val2017"))
    # Two ranks split the val images exactly once between them.
    halves = [[r["image_id"] for _, _, recs in dm.dataloader("val", rank, 2) for r in recs] for rank in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(seen) and not set(halves[0]) & set(halves[1])
