"""Issue 9, item 6: corrupt data (truncated tar, bad JPEGs, odd image modes) is decoded or skipped, counted and logged.

Shards are written by the real converter from a folder with CMYK and grayscale JPEGs, a 16-bit,
a palette and an RGBA PNG; then one val shard is truncated and a shard the converter would never
write (garbage bytes named ``.jpg``, a JPEG cut in half) is added with webdataset's TarWriter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow import MlflowClient
from PIL import Image

from pipeline.data import ShardDataModule
from pipeline.data.imagenet_wds import convert_imagenet_to_wds
from pipeline.data.manifest import ShardInfo, file_sha256, read_manifest
from pipeline.lightning_cli import build_fit
from tests.test_data_convert import encode, noise_image, write_image

VAL_GOOD_SHARDS = 10  # val-000000 (class a) and val-000001 (class b) stay intact; they hold all the odd modes
VAL_CONVERTED = 15  # and val-000002 (class c, plain RGB) is truncated to a quarter
GARBAGE = 2  # the hand-made shard: garbage bytes as .jpg, and a JPEG cut in half


def _write_source(root: Path, plain: dict[str, dict[str, int]]) -> None:
    """Classes a, b with the odd modes (named m_*, sorting first) plus plain JPEGs; c plain only."""
    rng = np.random.default_rng(0)
    for split, counts in plain.items():
        base = noise_image(rng, 40, 36)
        write_image(root / split / "a" / "m_cmyk.jpg", base.convert("CMYK"))
        write_image(root / split / "a" / "m_gray.jpg", base.convert("L"))
        write_image(root / split / "b" / "m_deep16.png",
                    Image.fromarray(rng.integers(0, 65536, (36, 40), dtype=np.uint16)))
        write_image(root / split / "b" / "m_palette.png", base.convert("P"))
        write_image(root / split / "b" / "m_alpha.png", base.convert("RGBA"))
        for cls, count in counts.items():
            for i in range(count):
                write_image(root / split / cls / f"z_rgb{i}.jpg", noise_image(rng, 40, 36))


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> Path:
    """val shards: [a: cmyk gray 3 rgb] [b: alpha deep16 palette 2 rgb] [c: 5 rgb, truncated] [garbage, cut JPEG]."""
    root = tmp_path_factory.mktemp("corrupt")
    _write_source(root / "src", {"train": {"a": 3, "b": 3, "c": 5}, "val": {"a": 3, "b": 2, "c": 5}})
    convert_imagenet_to_wds(root / "src", root / "wds", shard_size=5, progress=False)
    wds_dir = root / "wds"
    manifest = read_manifest(wds_dir)
    val = manifest.splits["val"]
    assert [s.num_samples for s in val.shards] == [5, 5, 5] and val.num_samples == VAL_CONVERTED
    assert manifest.splits["train"].num_skipped == 0 and val.num_skipped == 0  # every odd mode converted

    truncated = wds_dir / val.shards[2].name
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 4])  # within its first or second sample: the rest is gone

    extra = wds_dir / "val-000099.tar"
    good_jpeg = encode(noise_image(np.random.default_rng(1), 40, 40), "JPEG")
    with wds.TarWriter(str(extra)) as sink:
        sink.write({"__key__": "b/garbage", "jpg": b"\xff\xd8\xff\xe0 this is not a JPEG", "cls": "1"})
        sink.write({"__key__": "a/cut", "jpg": good_jpeg[: len(good_jpeg) // 2], "cls": "0"})
    val.shards.append(ShardInfo(extra.name, GARBAGE, extra.stat().st_size, file_sha256(extra)))
    val.num_samples += GARBAGE
    manifest.save(wds_dir / "manifest.json")
    return wds_dir


def _dm(location: Path, **kwargs) -> ShardDataModule:
    return ShardDataModule(str(location), **{"batch_size": 4, "num_workers": 0, "image_size": 32,
                                             "shuffle_buffer": 0, **kwargs})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_val_sample_is_decoded_or_counted(corrupt_shards, num_workers):
    dm = _dm(corrupt_shards, num_workers=num_workers)
    batches = list(dm.val_dataloader())
    decoded = sum(len(labels) for _, labels in batches)
    assert all(images.shape[1:] == (3, 32, 32) and torch.isfinite(images).all() for images, _ in batches)
    # The two intact shards, odd modes included, decode fully; the truncated shard loses at least
    # the sample it was cut in (and webdataset drops the rest of the tar): all counted.
    assert VAL_GOOD_SHARDS <= decoded <= VAL_GOOD_SHARDS + 2
    assert decoded + dm.skipped_samples == VAL_CONVERTED + GARBAGE
    assert dm.skipped_samples >= GARBAGE + 3


def test_odd_image_modes_are_decoded_not_skipped(corrupt_shards, tmp_path):
    """Only the odd-mode and plain shards: nothing is skipped, every image comes out 3-channel."""
    manifest = read_manifest(corrupt_shards)
    manifest.splits["val"].shards = manifest.splits["val"].shards[:2]
    manifest.splits["val"].class_counts = [5, 5, 0]
    manifest.splits["val"].num_samples = VAL_GOOD_SHARDS
    for shard in manifest.splits["val"].shards:
        (tmp_path / shard.name).symlink_to(corrupt_shards / shard.name)
    manifest.save(tmp_path / "manifest.json")
    dm = _dm(tmp_path)
    decoded = sum(len(labels) for _, labels in dm.val_dataloader())
    assert (decoded, dm.skipped_samples) == (VAL_GOOD_SHARDS, 0)


def test_skipped_samples_are_logged_to_mlflow_and_the_fit_goes_on(corrupt_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {
        "seed_everything": 0, "num_threads": 1,
        "model": {"model": {"arch": "mobilenet_v1", "width_mult": 0.25, "num_experts": 2, "resolution": 32,
                            "num_classes": 3},
                  "recipe": {"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0, "schedule": "constant"}},
        "data": {"data_dir": str(corrupt_shards), "batch_size": 4, "num_workers": 0, "image_size": 32,
                 "shuffle_buffer": 0, "train_augment": "none"},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False},
        "mlflow": {"tracking_uri": uri, "experiment_name": "corrupt"},
    }
    try:
        parts = build_fit(config)
        parts.fit()
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # MLFlowLogger sets it process-wide
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("corrupt").experiment_id])
    assert run.info.status == "FINISHED" and "val_top1" in run.data.metrics
    logged = run.data.metrics["data_skipped_samples"]
    assert logged == parts.datamodule.skipped_samples >= GARBAGE + 3  # val's skips at least, train's too
