"""`manifest.json`: what a directory of webdataset shards holds (classes, counts, shards, checksums).

The same file describes a directory of FFCV `.beton` files (one per split, listed as that
split's only shard; `format` says which kind of files a directory holds, `ffcv` how they were
written).

The manifest lets a data module know the number of classes and samples before opening a single
shard (the model checks `num_classes`, DDP needs `num_train` to fix the batches per epoch), and lets
anyone verify a copy of the shards with sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ManifestFacts",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_FFCV",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "file_sha256",
    "join_location",
    "read_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "condconv-wds/1"
MANIFEST_FORMAT_FFCV = "condconv-ffcv/1"
_MANIFEST_FORMATS = (MANIFEST_FORMAT, MANIFEST_FORMAT_FFCV)


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def join_location(location: str, name: str) -> str:
    """The URL or path of file `name` inside a shard location (a directory, URL prefix or template).

    `location` is a local directory, a URL prefix that webdataset can open (`https://host/dir`,
    `gs://bucket/dir`), or a template with `{}` standing for the file name, which is how `pipe:`
    commands name files: `pipe:aws s3 cp s3://bucket/imagenet/{} -`.
    """
    if "{}" in location:
        return location.replace("{}", name)
    if "://" in location or location.startswith("pipe:"):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


@dataclass
class ShardInfo:
    """One tar shard: file name (relative to the manifest), sample count, byte size and sha256."""

    name: str
    num_samples: int
    size: int
    sha256: str


@dataclass
class SplitInfo:
    """One split (`train` or `val`): its shards and per-class / per-format sample counts."""

    num_samples: int
    shards: list[ShardInfo]
    class_counts: list[int]
    image_formats: dict[str, int] = field(default_factory=dict)
    num_skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)

    @property
    def shard_names(self) -> list[str]:
        """Shard file names in manifest (= writing) order."""
        return [s.name for s in self.shards]


@dataclass
class Manifest:
    """Contents of `manifest.json`; `classes` are sorted, label `i` is `classes[i]`."""

    classes: list[str]
    splits: dict[str, SplitInfo]
    format: str = MANIFEST_FORMAT
    source: str | None = None
    max_side: int | None = None
    shard_size: int | None = None
    seed: int | None = None
    ffcv: dict[str, Any] | None = None  # FFCV writer options (FFCV directories only)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_formats(self) -> dict[str, int]:
        """Samples per image extension over all splits, e.g. `{"jpg": 1331167}`."""
        total: dict[str, int] = {}
        for split in self.splits.values():
            for ext, n in split.image_formats.items():
                total[ext] = total.get(ext, 0) + n
        return total

    def split(self, name: str) -> SplitInfo:
        """The named split; a missing one is a `ValueError` naming the splits present."""
        if name not in self.splits:
            raise ValueError(f"manifest has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the on-disk format)."""
        out = asdict(self)
        out["num_classes"] = self.num_classes
        out["image_formats"] = self.image_formats
        # Put the small, human-read fields first and the long shard lists last.
        order = [
            "format", "num_classes", "classes", "image_formats", "source", "max_side", "shard_size", "seed", "splits",
        ]  # fmt: skip
        if self.ffcv is not None:
            order.insert(-1, "ffcv")
        return {k: out[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        """Parse the on-disk dict; unknown format versions are refused."""
        if d.get("format") not in _MANIFEST_FORMATS:
            raise ValueError(f"unsupported manifest format {d.get('format')!r}; expected one of {list(_MANIFEST_FORMATS)}")
        splits = {}
        for name, s in d["splits"].items():
            shards = [ShardInfo(**sh) for sh in s["shards"]]
            splits[name] = SplitInfo(**{**s, "shards": shards})
        return cls(
            classes=list(d["classes"]),
            splits=splits,
            format=d["format"],
            source=d.get("source"),
            max_side=d.get("max_side"),
            shard_size=d.get("shard_size"),
            seed=d.get("seed"),
            ffcv=d.get("ffcv"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write as indented JSON (atomically: a reader never sees half a manifest)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def verify(self, directory: str | os.PathLike) -> None:
        """Check every shard of a local copy against its recorded size and sha256; raise `ValueError`."""
        bad = []
        for split in self.splits.values():
            for shard in split.shards:
                path = os.path.join(directory, shard.name)
                if not os.path.isfile(path):
                    bad.append(f"{shard.name} (missing)")
                elif os.path.getsize(path) != shard.size or file_sha256(path) != shard.sha256:
                    bad.append(f"{shard.name} (size or sha256 differs)")
        if bad:
            raise ValueError(f"shards in {directory} do not match the manifest: {', '.join(bad)}")


def read_manifest(location: str | os.PathLike) -> Manifest:
    """Read `manifest.json` from a shard location (local directory, URL prefix or `{}` template).

    A missing local manifest is a `FileNotFoundError` naming the path. Remote locations are read
    with webdataset's `gopen`, so a `pipe:` location runs its shell command.
    """
    location = os.fspath(location)
    url = join_location(location, MANIFEST_NAME)
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds  # remote only: keep local reads free of the import

        with wds.gopen(url, "rb") as f:
            raw = f.read()
        if not raw:
            raise FileNotFoundError(f"no manifest at {url} (empty read)")
    else:
        if not os.path.isfile(url):
            hint = "" if os.path.isdir(location) else " (the directory does not exist)"
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} at {url}{hint}; create shards with `condconv data imagenet-to-wds SRC DST`"
            )
        with open(url, "rb") as f:
            raw = f.read()
    try:
        return Manifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"malformed manifest at {url}: {err}") from err


class ManifestFacts:
    """What a classification data module tells about its data, read from its ``self._manifest``."""

    _manifest: Manifest

    def _require_samples(self, data_dir: str) -> None:
        # An empty split would only show up as a zero-length epoch (or a DDP hang) much later.
        for split in ("train", "val"):
            if self._manifest.split(split).num_samples == 0:
                raise ValueError(f"the {split} split in {data_dir} has no samples")

    @property
    def manifest(self) -> Manifest:
        """The parsed `manifest.json`."""
        return self._manifest

    @property
    def classes(self) -> list[str]:
        """Class names; label `i` is `classes[i]`."""
        return list(self._manifest.classes)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._manifest.num_classes

    @property
    def num_train(self) -> int:
        """Train samples."""
        return self._manifest.split("train").num_samples

    @property
    def num_val(self) -> int:
        """Val samples."""
        return self._manifest.split("val").num_samples
