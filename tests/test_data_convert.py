"""`imagenet-to-wds` converter: exact round trip, manifest, resizing, parallel writing, bad input.

The helpers here (`write_image`, `make_image_folder`, `make_indexed_folder`, `pixel_ids`) also
build the tiny data sets of the other `test_data_*` files.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.imagenet_wds import convert_imagenet_to_wds, scan_image_folder
from pipeline.data.manifest import file_sha256, read_manifest

# -- helpers shared by the test_data_* files ------------------------------------------------------

_PIL_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".JPEG": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """Encode a PIL image to bytes in PIL format `fmt`."""
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def write_image(path: Path, img: Image.Image) -> bytes:
    """Save `img` at `path` (format from the suffix); return the bytes written."""
    data = encode(img, _PIL_FORMATS[path.suffix])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def noise_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random RGB image."""
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), n_train=5, n_val=2, seed=0) -> dict[str, bytes]:
    """ImageNet-style folder of small noise images in mixed formats; returns {relative path: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    suffixes = [".JPEG", ".png", ".jpg"]
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            for i in range(n):
                rel = f"{split}/{c}/{c}_{i}{suffixes[i % 3]}"
                files[rel] = write_image(root / rel, noise_image(rng, 10 + i, 7 + 2 * i))
    return files


def make_indexed_folder(root: Path, n_classes=4, n_train=8, n_val=6, size=8) -> None:
    """Folder of solid-colour PNGs whose colour encodes a unique sample id (see `pixel_ids`).

    Train ids are 0.., val ids 10000..; solid images survive resize/crop/normalise unchanged.
    """
    next_id = {"train": 0, "val": 10000}
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            for _ in range(n):
                i = next_id[split]
                next_id[split] += 1
                img = Image.new("RGB", (size, size), (i % 256, i // 256, 40 * c))
                write_image(root / split / f"c{c}" / f"{i:05d}.png", img)


def pixel_ids(images) -> list[int]:
    """Recover the ids of `make_indexed_folder` images from a normalised batch [B,3,H,W]."""
    from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = np.array(IMAGENET_MEAN).reshape(1, 3)
    std = np.array(IMAGENET_STD).reshape(1, 3)
    h, w = images.shape[-2:]
    center = images[:, :, h // 2, w // 2].numpy() * std + mean
    rgb = np.rint(center * 255).astype(int)
    return [int(r + 256 * g) for r, g, _ in rgb]


def read_all_samples(dst: Path, split: str) -> list[dict]:
    """Every sample of a split's shards, in order, single process, no decoding."""
    manifest = read_manifest(dst)
    urls = [str(dst / s.name) for s in manifest.split(split).shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_is_exact_and_manifest_matches(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "wds"
    files = make_image_folder(src, n_train=7, n_val=3)
    # Awkward names: dots in the stem (webdataset splits keys at the first dot) and a subfolder.
    rng = np.random.default_rng(1)
    for rel in ("train/dog/img.v2.final.jpg", "train/dog/sub/deep.png"):
        files[rel] = write_image(src / rel, noise_image(rng, 9, 6))
    (src / "train/cat/.DS_Store").write_bytes(b"hidden files are not data")

    manifest = convert_imagenet_to_wds(src, dst, shard_size=4, progress=False)

    assert manifest.classes == ["cat", "dog", "eel"]
    on_disk = json.loads((dst / "manifest.json").read_text())
    assert on_disk["num_classes"] == 3 and on_disk["classes"] == ["cat", "dog", "eel"]
    for split in ("train", "val"):
        expected = {rel: data for rel, data in files.items() if rel.startswith(split + "/")}
        samples = read_all_samples(dst, split)
        info = manifest.split(split)
        assert info.num_samples == len(samples) == len(expected)
        assert info.num_skipped == 0
        assert sum(s.num_samples for s in info.shards) == len(samples)
        assert [s.name for s in info.shards] == [f"{split}-{i:06d}.tar" for i in range(-(-len(expected) // 4))]
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys)
        got = {}
        for s in samples:
            (ext,) = [k for k in ("jpg", "png") if k in s]
            got[(int(s["cls"]), s[ext])] = s["__key__"]
        want = {(manifest.classes.index(rel.split("/")[1]), data) for rel, data in expected.items()}
        assert set(got) == want  # every image exactly once, bytes identical, right label
        counts = [sum(1 for rel in expected if rel.split("/")[1] == c) for c in manifest.classes]
        assert info.class_counts == counts
        n_jpg = sum(r.lower().endswith(("jpg", "jpeg")) for r in expected)
        assert info.image_formats == {"jpg": n_jpg, "png": len(expected) - n_jpg}
        for shard in info.shards:
            assert shard.size == (dst / shard.name).stat().st_size
            assert shard.sha256 == file_sha256(dst / shard.name)
    manifest.verify(dst)
    assert read_manifest(dst) == manifest


def test_train_is_shuffled_across_shards_val_is_sorted(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "wds"
    make_image_folder(src, classes=("a", "b", "c", "d"), n_train=6, n_val=3)
    convert_imagenet_to_wds(src, dst, shard_size=6, progress=False)
    train_labels = [int(s["cls"]) for s in read_all_samples(dst, "train")]
    val_labels = [int(s["cls"]) for s in read_all_samples(dst, "val")]
    assert train_labels != sorted(train_labels)  # classes mixed across shards
    assert val_labels == sorted(val_labels)


def test_parallel_writing_gives_identical_shards(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, n_train=6, n_val=2)
    one = convert_imagenet_to_wds(src, tmp_path / "one", shard_size=3, workers=1, progress=False)
    two = convert_imagenet_to_wds(src, tmp_path / "two", shard_size=3, workers=2, progress=False)
    assert one.splits == two.splits  # same names, counts, sizes and sha256


def test_max_side_shrinks_large_images_only(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "wds"
    rng = np.random.default_rng(0)
    big_jpg = write_image(src / "train/a/big.jpg", noise_image(rng, 64, 40))
    write_image(src / "train/a/big2.png", noise_image(rng, 30, 50))
    small = write_image(src / "val/a/small.jpg", noise_image(rng, 20, 10))
    convert_imagenet_to_wds(src, dst, max_side=32, progress=False)
    train = {s["__key__"]: s for s in read_all_samples(dst, "train")}
    big = Image.open(io.BytesIO(train["a/big"]["jpg"]))
    assert big.format == "JPEG" and big.size == (32, 20)
    assert train["a/big"]["jpg"] != big_jpg
    assert Image.open(io.BytesIO(train["a/big2"]["png"])).size == (19, 32)
    (val,) = read_all_samples(dst, "val")
    assert val["jpg"] == small  # under the limit: original bytes
    assert read_manifest(dst).max_side == 32


# -- bad input --------------------------------------------------------------------------------


def test_non_image_files_are_skipped_and_counted_by_default(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "wds"
    make_image_folder(src, n_train=3, n_val=2)
    (src / "train/dog/notes.txt").write_text("not an image")
    (src / "val/eel/broken.jpg").write_bytes(b"\x00\x01garbage")
    manifest = convert_imagenet_to_wds(src, dst, progress=False)
    assert manifest.split("train").num_skipped == 1 and manifest.split("train").skipped_files == ["train/dog/notes.txt"]
    assert manifest.split("val").num_skipped == 1 and manifest.split("val").skipped_files == ["val/eel/broken.jpg"]
    assert manifest.split("train").num_samples == 9 and manifest.split("val").num_samples == 6


def test_strict_fails_before_writing_and_lists_bad_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "wds"
    make_image_folder(src, n_train=3, n_val=2)
    (src / "train/dog/notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"1 file\(s\) .* not readable images: train/dog/notes.txt"):
        convert_imagenet_to_wds(src, dst, strict=True, progress=False)
    assert not dst.exists()


def _layout(root: Path, spec: dict[str, list[str]]) -> Path:
    """Create `root/<split>/<class>/x.png` for each class in spec[split]."""
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in spec.items():
        (root / split).mkdir(exist_ok=True)
        for c in classes:
            write_image(root / split / c / "x.png", Image.new("RGB", (4, 4)))
    return root


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (None, FileNotFoundError, r"source directory .*missing_src does not exist"),
        ({}, ValueError, r"source directory .* is empty"),
        ({"train": ["a"]}, FileNotFoundError, r"val is missing; expected SRC/train/<class>/<image>"),
        ({"train": [], "val": ["a"]}, ValueError, r"train has no class folders"),
        ({"train": ["a", "b", "c"], "val": ["a", "d"]}, ValueError, r"only in train: \[b, c\]; only in val: \[d\]"),
    ],
)
def test_bad_source_layout_is_one_line_error(tmp_path, spec, error, message):
    src = tmp_path / "missing_src" if spec is None else _layout(tmp_path / "src", spec)
    with pytest.raises(error, match=message) as info:
        convert_imagenet_to_wds(src, tmp_path / "wds", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "wds").exists()  # nothing written before the checks


def test_empty_class_folder_and_bad_options_are_refused(tmp_path):
    src = _layout(tmp_path / "src", {"train": ["a"], "val": ["a"]})
    (src / "train/b").mkdir()
    (src / "val/b").mkdir()
    with pytest.raises(ValueError, match=r"class folders with no files: b"):
        scan_image_folder(src)
    (src / "train/b/y.png").write_bytes((src / "train/a/x.png").read_bytes())
    for kwargs in ({"shard_size": 0}, {"workers": 0}, {"max_side": 2}):
        (message,) = kwargs
        with pytest.raises(ValueError, match=message):
            convert_imagenet_to_wds(src, tmp_path / "wds", progress=False, **kwargs)


def test_existing_shards_need_overwrite(tmp_path):
    src, dst = _layout(tmp_path / "src", {"train": ["a"], "val": ["a"]}), tmp_path / "wds"
    convert_imagenet_to_wds(src, dst, progress=False)
    with pytest.raises(ValueError, match=r"already holds shards .*--overwrite"):
        convert_imagenet_to_wds(src, dst, progress=False)
    convert_imagenet_to_wds(src, dst, progress=False, overwrite=True)


def test_split_with_only_unreadable_files_is_an_error(tmp_path):
    src = _layout(tmp_path / "src", {"train": ["a"]})
    (src / "val/a").mkdir(parents=True)
    (src / "val/a/x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"every file of split\(s\) val"):
        convert_imagenet_to_wds(src, tmp_path / "wds", progress=False)
