"""FFCV: converters, `FFCVDataModule`, `data.format: ffcv`, bad `.beton` files, the missing-ffcv hint.

Real ffcv throughout (the `ffcv` extra is part of the test install): real `.beton` files written by
our converters and read by FFCV's compiled loader.
"""
from __future__ import annotations

import collections
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.cli import main
from pipeline.data.decode import decode_image
from pipeline.data.ffcv_install import FFCVNotInstalledError
from pipeline.data.formats import classification_data
from pipeline.data.imagenet_ffcv import convert_imagenet_to_ffcv, convert_wds_to_ffcv
from pipeline.data.imagenet_wds import convert_imagenet_to_wds
from pipeline.data.manifest import read_manifest
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.test_data_convert import make_image_folder, make_indexed_folder, pixel_ids

REPO = Path(__file__).resolve().parents[1]
# Raw FFCV loaders made here are kept alive, as pipeline.data.ffcv_loading keeps its own: a collected
# FFCV pipeline trips a numba finalizer (see that module's docstring).
_RAW_LOADERS: list = []


@pytest.fixture(scope="module")
def digits_ffcv(digits_shards: Path) -> dict[str, Path]:
    """The demo digits folder converted both ways to .beton files (raw mode), next to its wds shards."""
    root = digits_shards.parent
    out = root / "ffcv-from-folder"
    if not out.exists():
        convert_imagenet_to_ffcv(root / "raw", out, progress=False)
        convert_wds_to_ffcv(digits_shards, root / "ffcv-from-wds", workers=2, progress=False)
    return {"raw": root / "raw", "wds": digits_shards, "ffcv": out, "ffcv_from_wds": root / "ffcv-from-wds"}


@pytest.fixture
def small_ffcv(tmp_path: Path) -> Path:
    """A tiny FFCV directory (8 x 8 solid images; 32 train, 24 val) the test may damage."""
    make_indexed_folder(tmp_path / "src")
    convert_imagenet_to_ffcv(tmp_path / "src", tmp_path / "ffcv", progress=False)
    return tmp_path / "ffcv"


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes() + str(pixels.shape).encode()).hexdigest()


def _beton_pairs(path: Path) -> list[tuple[str, int]]:
    """(pixel digest, label) of every sample in stored order, decoded by FFCV without any transform."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=100, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    _RAW_LOADERS.append(loader)
    return [(_digest(img), int(y)) for images, labels in loader for img, y in zip(images, labels[:, 0])]


def _tar_pairs(shard_dir: Path, split: str) -> list[tuple[str, int]]:
    """(pixel digest, label) of every sample of the webdataset shards, decoded as ShardDataModule decodes."""
    urls = [str(shard_dir / s.name) for s in read_manifest(shard_dir).split(split).shards]
    return [(_digest(np.asarray(decode_image(s["png"]))), int(s["cls"]))
            for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def _unnormalised_pairs(batches) -> collections.Counter:
    """Multiset of (pixel digest, label) from normalised float batches, mapped back to uint8 pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = collections.Counter()
    for images, labels in batches:
        pixels = torch.round((images * std + mean) * 255)
        assert torch.all((pixels >= 0) & (pixels <= 255))
        hwc = pixels.permute(0, 2, 3, 1).to(torch.uint8).numpy()
        out.update((_digest(img), int(y)) for img, y in zip(hwc, labels))
    return out


# -- the same samples both ways -----------------------------------------------------------------------


def test_folder_to_ffcv_and_to_wds_hold_the_same_pixels_and_labels(digits_ffcv):
    for split, n in (("train", 1437), ("val", 360)):
        from_folder = _beton_pairs(digits_ffcv["ffcv"] / f"{split}.beton")
        tar = _tar_pairs(digits_ffcv["wds"], split)
        assert len(from_folder) == len(tar) == n
        assert from_folder == tar  # byte-exact pixels, same labels, same order (train shuffled alike)
        assert _beton_pairs(digits_ffcv["ffcv_from_wds"] / f"{split}.beton") == from_folder
    manifest, wds_manifest = read_manifest(digits_ffcv["ffcv"]), read_manifest(digits_ffcv["wds"])
    assert manifest.format == "condconv-ffcv/1" and manifest.classes == wds_manifest.classes
    for split in ("train", "val"):
        assert manifest.split(split).class_counts == wds_manifest.split(split).class_counts
        assert manifest.ffcv["stored_modes"][split] == {"raw": manifest.split(split).num_samples}
    manifest.verify(digits_ffcv["ffcv"])  # sizes and sha256 of the .beton files


def test_one_epoch_through_both_data_modules_gives_the_same_pairs(digits_ffcv):
    # 1437 = 3 x 479: with batch 479 (and no sample buffer on the wds side, whose train stream is
    # endless) one train epoch is every sample once on both paths.
    common = dict(batch_size=479, num_workers=1, image_size=32, val_resize=32, train_augment="none", shuffle_buffer=0)
    ffcv_dm = classification_data(str(digits_ffcv["ffcv"]), format="ffcv", **common)
    wds_dm = classification_data(str(digits_ffcv["wds"]), format="wds", **{**common, "num_workers": 0})
    assert type(ffcv_dm).__name__ == "FFCVDataModule" and type(wds_dm).__name__ == "ShardDataModule"
    assert (ffcv_dm.num_classes, ffcv_dm.num_train, ffcv_dm.num_val) == (10, 1437, 360)
    for split in ("train", "val"):
        ffcv_batches = list(ffcv_dm.dataloader(split))
        images, labels = ffcv_batches[0]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64
        ffcv_pairs = _unnormalised_pairs(ffcv_batches)
        assert ffcv_pairs == _unnormalised_pairs(wds_dm.dataloader(split))
        assert sum(ffcv_pairs.values()) == (1437 if split == "train" else 360)


def test_train_epochs_reshuffle_reproducibly_and_crops_have_the_right_size(digits_ffcv):
    # The standard train pipeline: random-resized crops to 24 of the 32 x 32 digits, flipped.
    dm = classification_data(str(digits_ffcv["ffcv"]), format="ffcv", batch_size=64, num_workers=2,
                             image_size=24, val_resize=32, seed=3)
    loader = dm.dataloader("train")
    assert dm.dataloader("train") is loader  # built (and compiled) once
    assert len(loader) == 1437 // 64
    epochs = [[(x.shape, y.tolist()) for x, y in loader] for _ in range(2)]
    assert {shape for epoch in epochs for shape, _ in epoch} == {(64, 3, 24, 24)}
    labels = [[y for _, y in epoch] for epoch in epochs]
    assert labels[0] != labels[1] and sorted(sum(labels[0], [])) != sum(labels[0], [])
    images, _ = next(iter(loader))
    assert -2.2 < images.min() < 0 < images.max() < 2.7  # normalised with the ImageNet mean and std
    again = classification_data(str(digits_ffcv["ffcv"]), format="ffcv", batch_size=64, num_workers=1,
                                image_size=32, val_resize=32, train_augment="none", seed=3).dataloader("train")
    assert [y.tolist() for _, y in again] == labels[0]  # the order depends on the seed and epoch only


# -- ranks --------------------------------------------------------------------------------------------


def test_ranks_get_equal_train_batches_and_see_val_exactly_once(small_ffcv):
    world_size = 3  # 2 ranks run for real in test_data_ffcv_ddp.py
    dm = classification_data(str(small_ffcv), format="ffcv", batch_size=4, num_workers=1, image_size=8,
                             val_resize=8, train_augment="none")
    train = [[pixel_ids(x) for x, _ in dm.dataloader("train", r, world_size)] for r in range(world_size)]
    assert {len(batches) for batches in train} == {32 // (world_size * 4)}
    seen = [i for batches in train for batch in batches for i in batch]
    assert len(seen) == len(set(seen))  # disjoint shares
    val = [i for r in range(world_size) for x, _ in dm.dataloader("val", r, world_size) for i in pixel_ids(x)]
    assert sorted(val) == list(range(10000, 10024))


# -- bad input ----------------------------------------------------------------------------------------


def test_damaged_or_foreign_beton_is_a_one_line_error(small_ffcv, tmp_path):
    ok = dict(format="ffcv", batch_size=4, image_size=8, val_resize=8)
    beton = small_ffcv / "train.beton"
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size - 100)
    with pytest.raises(ValueError, match=r"train\.beton has \d+ bytes but its manifest says \d+: the file is truncated"):
        classification_data(str(small_ffcv), **ok)

    beton.write_bytes(b"\xff" * read_manifest(small_ffcv).split("train").shards[0].size)  # foreign, right size
    with pytest.raises(ValueError, match=r"train\.beton is not an FFCV \.beton") as err:
        classification_data(str(small_ffcv), **ok)
    assert "\n" not in str(err.value) and "imagenet-to-ffcv" in str(err.value)

    with pytest.raises(ValueError, match="is a file; give the directory"):
        classification_data(str(beton), **ok)
    with pytest.raises(FileNotFoundError, match="no manifest.json .*condconv data imagenet-to-ffcv"):
        classification_data(str(tmp_path / "nowhere"), **ok)


def test_format_and_directory_must_agree_and_bad_options_are_refused(small_ffcv, tmp_path):
    make_indexed_folder(tmp_path / "src", n_classes=2, n_train=2, n_val=2)
    convert_imagenet_to_wds(tmp_path / "src", tmp_path / "wds", progress=False)
    with pytest.raises(ValueError, match="holds webdataset shards .* wds-to-ffcv"):
        classification_data(str(tmp_path / "wds"), format="ffcv")
    with pytest.raises(ValueError, match="holds FFCV .beton files, not webdataset shards: set data.format: ffcv"):
        classification_data(str(small_ffcv), format="wds")
    with pytest.raises(ValueError, match=r"data.format must be one of \['wds', 'ffcv'\], got 'tfrecord'"):
        classification_data(str(small_ffcv), format="tfrecord")
    with pytest.raises(ValueError, match=r"train_augment must be one of \['standard', 'none'\] .*'randaugment'"):
        classification_data(str(small_ffcv), format="ffcv", train_augment="randaugment")
    with pytest.raises(ValueError, match="make no full batch of 64 on each of 1 rank"):
        classification_data(str(small_ffcv), format="ffcv").dataloader("train")


def test_fit_cli_with_a_bad_ffcv_directory_is_one_line(tmp_path, capsys):
    from pipeline.lightning_cli import run_lightning_cli

    code = run_lightning_cli(["fit", "--config", str(REPO / "tasks/demo/fit.yaml"), "--data.format", "ffcv",
                              "--data.data_dir", str(tmp_path / "missing"), "--trainer.logger", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("condconv fit: error:") and "condconv data imagenet-to-ffcv" in err[0]


def test_missing_ffcv_says_how_to_install_it(small_ffcv, tmp_path, monkeypatch, capsys):
    # Only the import inside require_ffcv fails: ffcv is made unimportable for this test alone.
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(FFCVNotInstalledError, match=r"apt-get install -y libturbojpeg0-dev libopencv-dev .*"
                                                    r"pip install 'condconv\[ffcv\]'"):
        classification_data(str(small_ffcv), format="ffcv")
    make_indexed_folder(tmp_path / "src", n_classes=2, n_train=2, n_val=2)
    assert main(["data", "imagenet-to-ffcv", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs the optional package ffcv" in err and "libturbojpeg0-dev" in err
    assert not (tmp_path / "out").exists()  # refused before writing anything


# -- converter ----------------------------------------------------------------------------------------


def test_converter_skips_unreadable_files_and_records_how_it_wrote(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, n_train=4, n_val=2)  # 3 classes: 12 train, 6 val images
    (src / "train/cat/notes.txt").write_text("not an image")
    (src / "val/dog/broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = ["data", "imagenet-to-ffcv", str(src), str(tmp_path / "out"), "--write-mode", "proportion",
            "--compress-probability", "0.5", "--jpeg-quality", "80", "--max-resolution", "12", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train: 12 samples in train.beton" in out and "1 unreadable sample(s) skipped" in out
    manifest = read_manifest(tmp_path / "out")
    assert manifest.split("train").skipped_files == ["train/cat/notes.txt"]
    assert manifest.split("val").skipped_files == ["val/dog/broken.jpg"]
    assert manifest.ffcv["write_mode"] == "proportion" and manifest.ffcv["jpeg_quality"] == 80
    modes = manifest.ffcv["stored_modes"]
    assert sum(modes["train"].values()) == 12 and sum(modes["val"].values()) == 6
    assert set(modes["train"]) <= {"raw", "jpg"}
    # the proportion draw is seeded per sample: the same command gives the same split of modes
    assert main([*args[:3], str(tmp_path / "again"), *args[4:]]) == 0
    assert read_manifest(tmp_path / "again").ffcv["stored_modes"] == modes

    assert main([*args, "--strict"]) == 2  # existing output without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--strict", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "2 file(s)" in err and "notes.txt" in err and "broken.jpg" in err
    assert main(["data", "imagenet-to-ffcv", str(src), str(tmp_path / "x"), "--write-mode", "smart"]) == 2
    assert "needs smart_threshold" in capsys.readouterr().err
    assert main(["data", "wds-to-ffcv", str(tmp_path / "out"), str(tmp_path / "y")]) == 2
    assert "not webdataset shards" in capsys.readouterr().err


# -- training -----------------------------------------------------------------------------------------


def _demo_fit(data_dir: Path, fmt: str, workdir: Path) -> dict[str, float]:
    from pipeline.lightning_cli import build_fit, load_config

    config = load_config(REPO / "tasks/demo/fit.yaml", overrides={
        "data": {"data_dir": str(data_dir), "format": fmt},
        # The demo sweep's SGD recipe: well above chance in 3 epochs (the RMSProp demo needs ~6).
        "model": {"ema_decay": None,
                  "recipe": {"optimizer": "sgd", "lr": 0.2, "warmup_epochs": 0.5, "schedule": "cosine"}},
        "trainer": {"max_epochs": 3, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, "default_root_dir": str(workdir)},
    })  # fmt: skip
    threads = torch.get_num_threads()
    try:
        trainer = build_fit(config).fit()
    finally:
        torch.set_num_threads(threads)  # the demo config sets one thread for the process
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.slow
def test_demo_fit_with_ffcv_trains_like_webdataset(digits_ffcv, tmp_path):
    ffcv = _demo_fit(digits_ffcv["ffcv"], "ffcv", tmp_path)
    webdataset = _demo_fit(digits_ffcv["wds"], "wds", tmp_path)
    # Same model, recipe and samples; only the shuffle differs (a full permutation against shards + buffer).
    assert ffcv["val_top1"] > 0.5 and webdataset["val_top1"] > 0.5  # chance: 0.1
    assert abs(ffcv["val_top1"] - webdataset["val_top1"]) < 0.2
    assert abs(ffcv["train_loss"] - webdataset["train_loss"]) < 0.3
    assert ffcv["data_skipped_samples"] == 0



@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.timeout(60)
def test_a_failing_ffcv_pipeline_raises_instead_of_hanging(small_ffcv):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.pipeline.operation import Operation

    from pipeline.data.ffcv_loading import FFCVBatches

    class Explode(Operation):  # a pipeline stage that fails on FFCV's loader thread
        def generate_code(self):
            def explode(images, dst):
                raise OSError("disk went away")

            return explode

        def declare_state_and_memory(self, previous_state):
            return previous_state, None

    loader = Loader(str(small_ffcv / "val.beton"), batch_size=4, num_workers=1,
                    pipelines={"image": [SimpleRGBImageDecoder(), Explode()], "label": [IntDecoder()]})
    _RAW_LOADERS.append(loader)
    with pytest.raises(RuntimeError, match="FFCV's loader thread stopped before the end of the epoch"):
        list(FFCVBatches(loader))
