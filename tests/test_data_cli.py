"""`condconv data digits` and `condconv data imagenet-to-wds` through the top-level CLI."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pipeline.cli import main


def test_digits_then_imagenet_to_wds_then_shard_datamodule(tmp_path, capsys):
    raw, shards = tmp_path / "digits-raw", tmp_path / "digits-wds"
    assert main(["data", "digits", str(raw)]) == 0
    assert "1437 train and 360 val" in capsys.readouterr().out
    assert sorted(p.name for p in (raw / "train").iterdir()) == [str(d) for d in range(10)]
    img = Image.open(next((raw / "val" / "7").iterdir()))
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
    assert np.asarray(img).max() > 200  # real ink, not a blank image
    # Stratified: every class keeps ~20% of its images for val.
    for d in range(10):
        n_train, n_val = len(list((raw / "train" / str(d)).iterdir())), len(list((raw / "val" / str(d)).iterdir()))
        assert abs(n_val / (n_train + n_val) - 0.2) < 0.02

    args = ["data", "imagenet-to-wds", str(raw), str(shards), "--shard-size", "500", "--workers", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train: 1437 samples in 3 shard(s), 0 unreadable file(s) skipped" in out
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["image_formats"] == {"png": 1797}

    from pipeline.data import ShardDataModule

    dm = ShardDataModule(str(shards), batch_size=16, num_workers=0, image_size=32, train_augment="none")
    assert (dm.num_classes, dm.num_train, dm.num_val) == (10, 1437, 360)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (16, 3, 32, 32) and labels.max() < 10


def test_digits_split_is_seeded(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "digits", str(tmp_path / name), "--size", "8", "--format", "jpg"]) == 0
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))  # noqa: E731
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert main(["data", "digits", str(tmp_path / "c"), "--size", "8", "--seed", "1"]) == 0
    val_names = lambda root: sorted(p.name for p in (root / "val").rglob("*"))  # noqa: E731
    assert val_names(tmp_path / "c") != val_names(tmp_path / "a")


def test_bad_input_is_one_line_error_with_exit_code_2(tmp_path, capsys):
    assert main(["data", "imagenet-to-wds", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condconv data: error: source directory") and "nope" in err and "\n" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["data", "digits", str(tmp_path / "full")]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["data"]) == 2  # no sub-command: help, exit code 2
    assert "imagenet-to-wds" in capsys.readouterr().out
