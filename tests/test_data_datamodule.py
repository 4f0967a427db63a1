"""`ShardDataModule` on real shards: batches, equal train batches per rank, exactly-once val,
skipped-sample counting across workers, epochs and seeds, `pipe:` locations, bad input.

Ranks are simulated with `dataloader(split, rank, world_size)` (what the Trainer hooks call);
test_data_ddp.py runs the real 2-process DDP case.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import ShardDataModule
from pipeline.data.imagenet_wds import convert_imagenet_to_wds
from pipeline.data.manifest import ShardInfo, file_sha256, read_manifest
from pipeline.data.transforms import TRAIN_AUGMENTS, train_transform
from tests.test_data_convert import encode, make_indexed_folder, noise_image, pixel_ids, write_image

N_TRAIN, N_VAL, BATCH = 32, 24, 4
VAL_IDS = list(range(10000, 10000 + N_VAL))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 classes; 32 train samples in 3 shards (11, 11, 10), 24 val samples in 3 shards (11, 11, 2)."""
    root = tmp_path_factory.mktemp("indexed")
    make_indexed_folder(root / "src", n_classes=4, n_train=8, n_val=6)
    convert_imagenet_to_wds(root / "src", root / "wds", shard_size=11, progress=False)
    return root / "wds"


def _dm(location, **kwargs) -> ShardDataModule:
    kwargs = {"batch_size": BATCH, "num_workers": 0, "image_size": 8, "val_resize": 8, "shuffle_buffer": 8, **kwargs}
    return ShardDataModule(str(location), **kwargs)


def _ids(loader) -> list[int]:
    return [i for images, _ in loader for i in pixel_ids(images)]


def test_properties_and_batches(shards):
    dm = _dm(shards)
    assert (dm.num_classes, dm.classes, dm.num_train, dm.num_val) == (4, ["c0", "c1", "c2", "c3"], N_TRAIN, N_VAL)
    assert dm.manifest.split("train").num_samples == N_TRAIN
    loader = dm.train_dataloader()  # no Trainer attached: rank 0 of 1
    batches = list(loader)
    assert len(loader) == len(batches) == N_TRAIN // BATCH
    for images, labels in batches:
        assert images.shape == (BATCH, 3, 8, 8) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert labels.tolist() == [i // 8 for i in pixel_ids(images)]  # train ids 0..7 are class 0, ...
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_labels.tolist() == [(i - 10000) // 6 for i in pixel_ids(val_images)]


def test_one_process_epoch_without_sample_shuffle_reads_every_train_sample_once(shards):
    ids = _ids(_dm(shards, shuffle_buffer=0).train_dataloader())
    assert sorted(ids) == list(range(N_TRAIN))


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (2, 2), (3, 2), (5, 0)])
def test_every_rank_gets_the_same_number_of_full_train_batches(shards, world_size, num_workers):
    # 3 shards never divide evenly over ranks x workers here; (5, 0) has fewer shards than ranks.
    dm = _dm(shards, num_workers=num_workers)
    expected = max(1, N_TRAIN // (world_size * BATCH))
    for rank in range(world_size):
        loader = dm.dataloader("train", rank, world_size)
        sizes = [len(labels) for _, labels in loader]
        assert len(loader) == len(sizes) == expected
        assert set(sizes) == {BATCH}


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (1, 2), (2, 0), (2, 2), (3, 2), (4, 0)])
def test_val_reads_every_sample_exactly_once_across_ranks_and_workers(shards, world_size, num_workers):
    dm = _dm(shards, num_workers=num_workers)
    seen = []
    for rank in range(world_size):
        loader = dm.dataloader("val", rank, world_size)
        batches = list(loader)
        assert len(loader) == len(batches)  # exact: nothing is skipped here
        rank_ids = [i for images, _ in batches for i in pixel_ids(images)]
        assert len(rank_ids) > 0  # no rank idles (it would skip validation and hang the others)
        seen += rank_ids
    assert sorted(seen) == VAL_IDS


def test_epochs_reshuffle_and_the_seed_reproduces(shards):
    loader = _dm(shards, seed=1).train_dataloader()
    epoch0, epoch1 = _ids(loader), _ids(loader)
    assert epoch0 != epoch1
    assert _ids(_dm(shards, seed=1).train_dataloader()) == epoch0
    assert _ids(_dm(shards, seed=2).train_dataloader()) != epoch0


def test_pipe_location_reads_through_a_shell_command(shards):
    dm = _dm(f"pipe:cat {shards}/{{}}")
    assert dm.num_classes == 4
    assert sorted(_ids(dm.val_dataloader())) == VAL_IDS


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> Path:
    """Shards with odd image modes, a truncated JPEG per split, and hand-made broken samples."""
    root = tmp_path_factory.mktemp("odd")
    src, dst = root / "src", root / "wds"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        base = noise_image(rng, 12, 10)
        write_image(src / split / "a" / "cmyk.jpg", base.convert("CMYK"))
        write_image(src / split / "a" / "gray.jpg", base.convert("L"))
        write_image(src / split / "b" / "deep.png", Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16)))
        write_image(src / split / "b" / "palette.png", base.convert("P"))
        write_image(src / split / "b" / "alpha.png", base.convert("RGBA"))
        good = encode(noise_image(rng, 40, 40), "JPEG")
        (src / split / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # valid header: gets in
    convert_imagenet_to_wds(src, dst, shard_size=3, progress=False)
    # A shard the converter would never write: no image, unparsable label, garbage "jpg".
    extra = dst / "val-000009.tar"
    with wds.TarWriter(str(extra)) as sink:
        sink.write({"__key__": "x/no_image", "txt": "hello", "cls": "0"})
        sink.write({"__key__": "x/bad_label", "png": encode(base, "PNG"), "cls": "zebra"})
        sink.write({"__key__": "x/garbage", "jpg": b"\xff\xd8 not really", "cls": "1"})
    manifest = read_manifest(dst)
    manifest.splits["val"].shards.append(ShardInfo(extra.name, 3, extra.stat().st_size, file_sha256(extra)))
    manifest.save(dst / "manifest.json")
    return dst


def test_corrupt_samples_are_skipped_and_counted_across_workers(odd_shards):
    dm = _dm(odd_shards, num_workers=2, image_size=8, val_resize=10, batch_size=2)
    val = list(dm.val_dataloader())
    assert sum(len(labels) for _, labels in val) == 5  # 6 files + 3 hand-made, 1 truncated + 3 broken skipped
    assert all(images.shape[1:] == (3, 8, 8) for images, _ in val)
    assert dm.skipped_samples == 4  # counted in the worker processes, visible here
    train = list(dm.train_dataloader())
    assert all(images.shape == (2, 3, 8, 8) and torch.isfinite(images).all() for images, _ in train)
    assert dm.skipped_samples >= 4  # the truncated train JPEG is skipped whenever its shard is read


def test_missing_manifest_and_bad_arguments(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / "manifest.json")):
        ShardDataModule(str(tmp_path / "nothing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="unsupported manifest format"):
        ShardDataModule(str(tmp_path / "bad"))
    for kwargs, message in (
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"train_augment": "mixup"}, r"train_augment must be one of \['standard', 'none', 'randaugment', 'autoa"),
        ({"image_size": 32, "val_resize": 16}, "val_resize"),
    ):
        with pytest.raises(ValueError, match=message):
            ShardDataModule(str(shards), **kwargs)
    with pytest.raises(ValueError, match="split must be"):
        _dm(shards).dataloader("test")


@pytest.mark.parametrize("augment", TRAIN_AUGMENTS)
def test_train_augments_give_normalised_crops(augment):
    out = train_transform(16, augment)(noise_image(np.random.default_rng(0), 30, 20))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and type(out) is torch.Tensor


@pytest.mark.timeout(120)
def test_unreadable_train_shards_raise_instead_of_spinning(tmp_path, shards):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((shards / "manifest.json").read_text())  # shards absent here
    with pytest.raises(RuntimeError, match="no sample could be read from the shards"):
        next(iter(_dm(broken).train_dataloader()))


@pytest.mark.timeout(120)
def test_train_stream_of_only_undecodable_samples_raises(tmp_path, monkeypatch):
    import pipeline.data.shard_datamodule as sdm

    monkeypatch.setattr(sdm, "_MAX_LEADING_FAILURES", 5)  # instead of reading 1000 broken samples
    good = encode(noise_image(np.random.default_rng(0), 40, 40), "JPEG")
    for split in ("train", "val"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
        (tmp_path / "src" / split / "a" / "x.jpg").write_bytes(good[: len(good) // 2])  # header fine, body cut
    convert_imagenet_to_wds(tmp_path / "src", tmp_path / "wds", progress=False)
    with pytest.raises(RuntimeError, match="were all undecodable"):
        next(iter(_dm(tmp_path / "wds", batch_size=1).train_dataloader()))
