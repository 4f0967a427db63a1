"""`condconv data imagenet-to-ffcv` and `condconv data wds-to-ffcv` (registered in `pipeline.data.cli`).

Heavy imports (ffcv, numba) stay inside the handlers; a missing ffcv is a one-line error with the
install hint (`FFCVNotInstalledError` is a `ValueError`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_imagenet_to_ffcv", "add_wds_to_ffcv"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 100], got {text}")
    return value


def _writer_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        write_mode=args.write_mode,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability,
        smart_threshold=args.smart_threshold,
        workers=args.workers,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def _report(manifest: Any, dst: str) -> None:
    for name, split in manifest.splits.items():
        stored = ", ".join(f"{n} {mode}" for mode, n in manifest.ffcv["stored_modes"][name].items())
        print(
            f"{name}: {split.num_samples} samples in {split.shards[0].name} ({stored}), "
            f"{split.num_skipped} unreadable sample(s) skipped"
        )
        for path in split.skipped_files[:5]:
            print(f"  skipped {path}", file=sys.stderr)
    print(f"{manifest.num_classes} classes; manifest: {dst}/manifest.json")


def _imagenet_to_ffcv(args: argparse.Namespace) -> int:
    from pipeline.data.imagenet_ffcv import convert_imagenet_to_ffcv

    _report(convert_imagenet_to_ffcv(args.src, args.dst, seed=args.seed, **_writer_options(args)), args.dst)
    return 0


def _wds_to_ffcv(args: argparse.Namespace) -> int:
    from pipeline.data.imagenet_ffcv import convert_wds_to_ffcv

    _report(convert_wds_to_ffcv(args.src, args.dst, **_writer_options(args)), args.dst)
    return 0


def _add_writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--write-mode", choices=("raw", "jpg", "smart", "proportion"), default="raw",
        help="how images are stored: raw uint8 pixels (exact, large, fastest to load), jpg (re-encoded), "
             "proportion (jpg with probability --compress-probability, else raw) or smart (jpg when the raw "
             "pixels exceed --smart-threshold bytes); default: raw",
    )  # fmt: skip
    p.add_argument("--max-resolution", type=_positive_int, default=None,
                   help="shrink images whose longer side exceeds N pixels (default: keep the size)")
    p.add_argument("--jpeg-quality", type=_quality, default=90,
                   help="JPEG quality 1-100 of the compressed samples (default: 90)")
    p.add_argument("--compress-probability", type=_probability, default=0.5,
                   help="share of samples stored as JPEG with --write-mode proportion (default: 0.5)")
    p.add_argument("--smart-threshold", type=_positive_int, default=None,
                   help="with --write-mode smart: raw size in bytes above which an image is stored as JPEG")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes decoding and writing (default: 1)")
    p.add_argument("--strict", action="store_true", help="fail (listing them) if any sample is not a readable image")
    p.add_argument("--overwrite", action="store_true", help="replace .beton files and the manifest already in DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_imagenet_to_ffcv(sub: argparse._SubParsersAction) -> None:
    """Add `condconv data imagenet-to-ffcv SRC DST`."""
    p = sub.add_parser(
        "imagenet-to-ffcv",
        help="convert an ImageNet-style folder into FFCV .beton files + manifest.json (needs condconv[ffcv])",
        description="Convert SRC/train/<class>/* and SRC/val/<class>/* into DST/train.beton, DST/val.beton and "
        "DST/manifest.json: the samples, order and manifest of imagenet-to-wds, stored with FFCV's "
        "RGBImageField. Unreadable files are skipped, counted and listed in the manifest unless --strict.",
    )
    p.add_argument("src", help="ImageNet-style folder with train/ and val/ class folders")
    p.add_argument("dst", help="output directory for the .beton files and manifest.json")
    _add_writer_options(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train sample order and of --write-mode proportion (default: 0)")
    p.set_defaults(func=_imagenet_to_ffcv)


def add_wds_to_ffcv(sub: argparse._SubParsersAction) -> None:
    """Add `condconv data wds-to-ffcv SRC DST`."""
    p = sub.add_parser(
        "wds-to-ffcv",
        help="convert local webdataset shards (with their manifest.json) into FFCV .beton files (needs condconv[ffcv])",
        description="Convert the shards in SRC (made by imagenet-to-wds) into DST/train.beton, DST/val.beton and "
        "DST/manifest.json, keeping the shards' sample order: the same samples as imagenet-to-ffcv of the "
        "original folder. Samples without an image or label, or that do not decode, are skipped and counted.",
    )
    p.add_argument("src", help="local directory with webdataset shards and their manifest.json")
    p.add_argument("dst", help="output directory for the .beton files and manifest.json")
    _add_writer_options(p)
    p.set_defaults(func=_wds_to_ffcv)
