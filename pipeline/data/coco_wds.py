"""Convert COCO-format detection data (images + ``instances_*.json``) into webdataset shards.

Input (`SRC`), as a COCO download unpacks::

    SRC/annotations/instances_train2017.json   SRC/train2017/<file_name>
    SRC/annotations/instances_val2017.json     SRC/val2017/<file_name>

Every ``annotations/instances_<split>.json`` is one split; its images are looked up in
``SRC/<split>/`` (or, failing that, ``SRC/images/<split>/``). Output (`DST/`):
``<split>-000000.tar ...`` and ``manifest.json`` (format ``condconv-coco-wds/1``: the category
map, per-split counts, shards with sha256). A sample is ``<key>.<ext>`` (the original image
bytes) and ``<key>.json``: ``{"image_id", "file_name", "width", "height", "annotations": [{"id",
"category_id", "bbox" [x, y, w, h], "area", "iscrowd"}]}``, i.e. the COCO records of that image.

What is kept, as COCO does: images without annotations (they count in evaluation: every
detection on them is a false positive); crowd annotations (``iscrowd=1``), which training
ignores and COCO evaluation treats as ignore regions. What is changed, and counted per split in
the manifest: boxes reaching outside their image are clipped to it (``num_clipped_boxes``);
boxes with no area left (after clipping, or given so) are dropped (``num_dropped_boxes``).
What is refused, with a one-line error before anything is written: a file that is not a COCO
instances json, an annotation naming a category or image id the file does not define, duplicate
ids, a missing image file.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.decode import ImageDecodeError, sniff_format
from pipeline.data.manifest import MANIFEST_NAME, ShardInfo, file_sha256, join_location

__all__ = [
    "COCO_MANIFEST_FORMAT",
    "CocoManifest",
    "CocoSplitInfo",
    "convert_coco_to_wds",
    "load_coco_instances",
    "read_coco_manifest",
]

COCO_MANIFEST_FORMAT = "condconv-coco-wds/1"
_TAR_MTIME = 0  # byte-identical shards for the same input
_REQUIRED_KEYS = ("images", "annotations", "categories")
_ANN_FILE = re.compile(r"instances_(?P<split>[A-Za-z0-9_.-]+)\.json")


@dataclass
class CocoSplitInfo:
    """One split: images, annotations (crowd ones included), what was kept or changed, and its shards."""

    num_images: int
    num_annotations: int
    num_crowd: int
    num_empty_images: int
    num_clipped_boxes: int
    num_dropped_boxes: int
    category_counts: list[int]  # non-crowd boxes per category, in `categories` order
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Samples (= images) in the shards."""
        return self.num_images


@dataclass
class CocoManifest:
    """Contents of a detection ``manifest.json``: COCO categories (``id``, ``name``, ``supercategory``) and splits.

    Label ``i + 1`` of a detector is ``categories[i]`` (0 is background); evaluation maps it
    back to the category's COCO ``id``.
    """

    categories: list[dict[str, Any]]
    splits: dict[str, CocoSplitInfo]
    format: str = COCO_MANIFEST_FORMAT
    source: str | None = None
    shard_size: int | None = None
    seed: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of object categories (background not counted)."""
        return len(self.categories)

    @property
    def category_ids(self) -> list[int]:
        """COCO category ids in label order."""
        return [int(c["id"]) for c in self.categories]

    def split(self, name: str) -> CocoSplitInfo:
        """The named split; a missing one is a `ValueError` naming the splits present."""
        if name not in self.splits:
            raise ValueError(f"manifest has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def find_split(self, prefix: str) -> str:
        """The one split whose name starts with ``prefix`` (``train`` -> ``train2017``)."""
        names = sorted(s for s in self.splits if s.startswith(prefix))
        if len(names) != 1:
            raise ValueError(f"expected one split starting with {prefix!r}, found {names or 'none'} among "
                             f"{sorted(self.splits)}; name the split explicitly")
        return names[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the on-disk format)."""
        out = asdict(self)
        out["num_classes"] = self.num_classes
        order = ["format", "num_classes", "categories", "source", "shard_size", "seed", "splits"]
        return {k: out[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CocoManifest":
        """Parse the on-disk dict; other formats are refused."""
        if d.get("format") != COCO_MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {d.get('format')!r}; expected {COCO_MANIFEST_FORMAT!r} "
                             "(make detection shards with `condconv data coco-to-wds SRC DST`)")
        splits = {name: CocoSplitInfo(**{**s, "shards": [ShardInfo(**sh) for sh in s["shards"]]})
                  for name, s in d["splits"].items()}
        return cls(categories=list(d["categories"]), splits=splits, format=d["format"], source=d.get("source"),
                   shard_size=d.get("shard_size"), seed=d.get("seed"))

    def save(self, path: str | os.PathLike) -> None:
        """Write as indented JSON, atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)


def read_coco_manifest(location: str | os.PathLike) -> CocoManifest:
    """Read a detection ``manifest.json`` from a local directory, URL prefix or ``{}`` template."""
    location = os.fspath(location)
    url = join_location(location, MANIFEST_NAME)
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        with wds.gopen(url, "rb") as f:
            raw = f.read()
    else:
        if not os.path.isfile(url):
            raise FileNotFoundError(f"no {MANIFEST_NAME} at {url}; create detection shards with "
                                    "`condconv data coco-to-wds SRC DST`")
        raw = Path(url).read_bytes()
    try:
        return CocoManifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"malformed manifest at {url}: {err}") from err


# ----------------------------------------------------------------------------- reading the json
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_coco_instances(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a COCO instances json; a one-line ValueError names the first problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a COCO instances json: not valid JSON ({err})") from None
    if not isinstance(data, dict) or any(k not in data for k in _REQUIRED_KEYS):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a COCO instances json: expected keys {list(_REQUIRED_KEYS)}, found {have}")
    for key in _REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key!r} is a {type(data[key]).__name__}; expected a list")
    cat_ids: set[int] = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise ValueError(f"{path}: category {c!r}; expected {{'id': int, 'name': str, ...}}")
        if c["id"] in cat_ids:
            raise ValueError(f"{path}: category id {c['id']} appears twice")
        cat_ids.add(c["id"])
    if not cat_ids:
        raise ValueError(f"{path}: no categories")
    image_ids: set[int] = set()
    for im in data["images"]:
        ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
        if not ok or not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height")):
            raise ValueError(f"{path}: image {im!r}; expected {{'id': int, 'file_name': str, 'width': int > 0, "
                             "'height': int > 0}")
        if im["id"] in image_ids:
            raise ValueError(f"{path}: image id {im['id']} appears twice")
        image_ids.add(im["id"])
    ann_ids: set[int] = set()
    for a in data["annotations"]:
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if not (isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("image_id"), int)
                and isinstance(a.get("category_id"), int) and isinstance(bbox, list) and len(bbox) == 4
                and all(_is_number(v) for v in bbox)):
            raise ValueError(f"{path}: annotation {str(a)[:200]}; expected {{'id': int, 'image_id': int, "
                             "'category_id': int, 'bbox': [x, y, w, h], ...}")
        if a["id"] in ann_ids:
            raise ValueError(f"{path}: annotation id {a['id']} appears twice")
        ann_ids.add(a["id"])
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{path}: annotation {a['id']} has unknown category_id {a['category_id']}; "
                             f"the file defines {sorted(cat_ids)}")
        if a["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotation {a['id']} refers to unknown image_id {a['image_id']}")
    return data


def _clip(bbox: Sequence[float], width: int, height: int) -> tuple[list[float], bool]:
    """The box clipped to the image, and whether it reached outside (boxes inside are returned unchanged)."""
    x, y, w, h = (float(v) for v in bbox)
    if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
        return [x, y, w, h], False
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    return [x0, y0, x1 - x0, y1 - y0], True


@dataclass
class _Record:
    key: str
    image_path: Path
    meta: dict[str, Any]


def _split_records(data: dict[str, Any], image_dir: Path, categories: list[dict[str, Any]],
                   split: str) -> tuple[list[_Record], CocoSplitInfo]:
    """Per-image records with clipped boxes, and the split's counts (no image is opened)."""
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    info = CocoSplitInfo(num_images=0, num_annotations=0, num_crowd=0, num_empty_images=0, num_clipped_boxes=0,
                         num_dropped_boxes=0, category_counts=[0] * len(categories))
    records, missing = [], []
    for im in sorted(data["images"], key=lambda im: im["id"]):
        path = image_dir / im["file_name"]
        if not path.is_file():
            missing.append(im["file_name"])
            continue
        anns = []
        for a in sorted(by_image[im["id"]], key=lambda a: a["id"]):
            box, clipped = _clip(a["bbox"], im["width"], im["height"])
            if box[2] <= 0 or box[3] <= 0:
                info.num_dropped_boxes += 1
                continue
            info.num_clipped_boxes += clipped
            crowd = int(bool(a.get("iscrowd", 0)))
            area = float(a["area"]) if _is_number(a.get("area")) else box[2] * box[3]
            anns.append({"id": a["id"], "category_id": a["category_id"], "bbox": box, "area": area, "iscrowd": crowd})
            info.num_annotations += 1
            info.num_crowd += crowd
            if not crowd:
                info.category_counts[label_of[a["category_id"]]] += 1
        info.num_images += 1
        info.num_empty_images += not anns
        meta = {"image_id": im["id"], "file_name": im["file_name"], "width": im["width"], "height": im["height"],
                "annotations": anns}
        records.append(_Record(f"{im['id']:012d}", path, meta))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in total)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"split {split}: {len(missing)} image file(s) listed in the json are not in "
                                f"{image_dir}: {shown}")
    return records, info


def _image_dir(src: Path, split: str) -> Path:
    for candidate in (src / split, src / "images" / split):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no image folder for split {split!r}: expected {src / split} or {src / 'images' / split}")


def _write_shard(path: Path, records: Sequence[_Record]) -> ShardInfo:
    import webdataset as wds

    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=_TAR_MTIME, format="PAX_FORMAT") as sink:
        for r in records:
            data = r.image_path.read_bytes()
            try:
                ext = sniff_format(data)
            except ImageDecodeError as err:
                raise ValueError(f"{r.image_path} is not a readable image: {err}") from None
            sink.write({"__key__": r.key, ext: data, "json": json.dumps(r.meta).encode()})
    os.replace(tmp, path)
    return ShardInfo(path.name, len(records), path.stat().st_size, file_sha256(path))


def convert_coco_to_wds(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> CocoManifest:
    """Convert ``src`` (COCO layout) into shards + ``manifest.json`` in ``dst``; see the module doc.

    ``splits``: which ``instances_<split>.json`` to convert (default: all found). All splits
    must define the same categories. Train splits (names starting with ``train``) are shuffled
    with ``seed`` across shards; others keep image-id order. Everything is checked before writing.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    src, dst = Path(src), Path(dst)
    ann_dir = src / "annotations"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"{ann_dir} does not exist; expected SRC/annotations/instances_<split>.json "
                                "and SRC/<split>/<images>")
    found = {m["split"]: ann_dir / m.group(0) for p in sorted(ann_dir.iterdir()) if (m := _ANN_FILE.fullmatch(p.name))}
    if not found:
        raise FileNotFoundError(f"no instances_<split>.json in {ann_dir}")
    names = list(splits) if splits else sorted(found)
    unknown = [s for s in names if s not in found]
    if unknown:
        raise ValueError(f"split(s) {unknown} have no annotations file in {ann_dir}; found {sorted(found)}")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory")
    if (dst / MANIFEST_NAME).exists() and not overwrite:
        raise ValueError(f"destination {dst} already holds shards (manifest.json); pass --overwrite to replace them")

    categories: list[dict[str, Any]] | None = None
    plans: dict[str, tuple[list[_Record], CocoSplitInfo]] = {}
    for split in names:
        data = load_coco_instances(found[split])
        cats = sorted(({"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
                       for c in data["categories"]), key=lambda c: c["id"])
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"{found[split]} defines other categories than {found[names[0]]}; all splits must agree")
        records, info = _split_records(data, _image_dir(src, split), cats, split)
        if split.startswith("train"):
            random.Random(seed).shuffle(records)
        plans[split] = (records, info)
    assert categories is not None

    dst.mkdir(parents=True, exist_ok=True)
    for split in names:
        for stale in dst.glob(f"{split}-*.tar"):
            stale.unlink()
    out_splits = {}
    for split, (records, info) in plans.items():
        for i, start in enumerate(range(0, max(len(records), 1), shard_size)):
            chunk = records[start:start + shard_size]
            if chunk:
                info.shards.append(_write_shard(dst / f"{split}-{i:06d}.tar", chunk))
        out_splits[split] = info
    manifest = CocoManifest(categories=categories, splits=out_splits, source=str(src.resolve()),
                            shard_size=shard_size, seed=seed)
    manifest.save(dst / MANIFEST_NAME)
    return manifest
