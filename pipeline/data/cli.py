"""`condconv data ...`: dataset preparation commands (argparse; heavy imports stay inside handlers).

To add a command (e.g. `imagenet-to-ffcv`, `coco-to-wds`): write `_add_<name>(sub)` that adds its
parser and sets `func` to a handler `(args) -> int`, and list it in `_COMMANDS`. Handlers raise
`ValueError`/`FileNotFoundError` for bad input; `pipeline.cli.main` prints those as one line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.data.ffcv_cli import add_imagenet_to_ffcv, add_wds_to_ffcv


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# -- condconv data digits -----------------------------------------------------------------------


def _digits(args: argparse.Namespace) -> int:
    from pipeline.data.digits import write_digits

    counts = write_digits(
        args.dst,
        size=args.size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image_format=args.format,
        overwrite=args.overwrite,
    )
    print(f"wrote {counts['train']} train and {counts['val']} val digit images (10 classes) to {args.dst}")
    return 0


def _add_digits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "digits",
        help="write scikit-learn's handwritten digits as an ImageNet-style folder (the demo data)",
        description="Write sklearn.datasets.load_digits (1797 real 8x8 scans, 10 classes, bundled with "
        "scikit-learn: no download) as DST/{train,val}/<digit>/<index>.png, RGB, upscaled, with a "
        "seeded stratified train/val split.",
    )
    p.add_argument("dst", help="output folder")
    p.add_argument("--size", type=int, default=32, help="side of the output images in pixels (default: 32)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction per class (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image format (default: png)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=_digits)


# -- condconv data imagenet-to-wds --------------------------------------------------------------


def _imagenet_to_wds(args: argparse.Namespace) -> int:
    from pipeline.data.imagenet_wds import convert_imagenet_to_wds

    manifest = convert_imagenet_to_wds(
        args.src,
        args.dst,
        shard_size=args.shard_size,
        max_side=args.max_side,
        workers=args.workers,
        strict=args.strict,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    for name, split in manifest.splits.items():
        print(
            f"{name}: {split.num_samples} samples in {len(split.shards)} shard(s), "
            f"{split.num_skipped} unreadable file(s) skipped"
        )
        for path in split.skipped_files[:5]:
            print(f"  skipped {path}", file=sys.stderr)
    print(f"{manifest.num_classes} classes; manifest: {args.dst}/manifest.json")
    return 0


def _add_imagenet_to_wds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "imagenet-to-wds",
        help="convert an ImageNet-style folder into webdataset tar shards + manifest.json",
        description="Convert SRC/train/<class>/* and SRC/val/<class>/* into DST/train-NNNNNN.tar, "
        "DST/val-NNNNNN.tar and DST/manifest.json. Unreadable or non-image files are skipped, counted "
        "and listed in the manifest unless --strict is given.",
    )
    p.add_argument("src", help="ImageNet-style folder with train/ and val/ class folders")
    p.add_argument("dst", help="output directory for the shards and manifest.json")
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument(
        "--max-side", type=_positive_int, default=None,
        help="shrink images whose longer side exceeds N pixels (aspect kept; re-encoded); default: keep original bytes",
    )  # fmt: skip
    p.add_argument("--workers", type=_positive_int, default=1, help="processes writing shards in parallel (default: 1)")
    p.add_argument("--strict", action="store_true", help="fail (listing them) if any file is not a readable image")
    p.add_argument("--seed", type=int, default=0, help="seed of the train sample shuffle across shards (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_imagenet_to_wds)


# -- condconv data shapes / coco-to-wds -----------------------------------------------------------


def _shapes(args: argparse.Namespace) -> int:
    from pipeline.data.shapes import write_shapes

    counts = write_shapes(args.dst, num_train=args.num_train, num_val=args.num_val, size=args.size,
                          seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {counts['train2017']} train and {counts['val2017']} val shape images (COCO format) to {args.dst}")
    return 0


def _add_shapes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shapes",
        help="write a synthetic COCO-format detection set (the detection demo data)",
        description="Write circles, squares and triangles on textured backgrounds as DST/{train2017,val2017}/*.jpg "
        "and DST/annotations/instances_{train2017,val2017}.json (COCO format, seeded; with empty images and "
        "crowd regions), for `condconv data coco-to-wds`.",
    )
    p.add_argument("dst", help="output folder")
    p.add_argument("--num-train", type=_positive_int, default=400, help="train images (default: 400)")
    p.add_argument("--num-val", type=_positive_int, default=100, help="val images (default: 100)")
    p.add_argument("--size", type=_positive_int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=_shapes)


def _coco_to_wds(args: argparse.Namespace) -> int:
    from pipeline.data.coco_wds import convert_coco_to_wds

    manifest = convert_coco_to_wds(args.src, args.dst, splits=args.splits, shard_size=args.shard_size,
                                   seed=args.seed, overwrite=args.overwrite)
    for name, split in manifest.splits.items():
        print(
            f"{name}: {split.num_images} images ({split.num_empty_images} without boxes) in {len(split.shards)} "
            f"shard(s); {split.num_annotations} boxes ({split.num_crowd} crowd); {split.num_clipped_boxes} clipped "
            f"to their image, {split.num_dropped_boxes} dropped (no area)"
        )
    print(f"{manifest.num_classes} categories; manifest: {args.dst}/manifest.json")
    return 0


def _add_coco_to_wds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coco-to-wds",
        help="convert COCO-format detection data into webdataset tar shards + manifest.json",
        description="Convert SRC/annotations/instances_<split>.json with images in SRC/<split>/ into "
        "DST/<split>-NNNNNN.tar and DST/manifest.json (category map, counts). Empty images and crowd boxes are "
        "kept (as COCO evaluation expects); boxes outside their image are clipped, boxes without area dropped, "
        "both counted. A json that is not COCO, unknown category or image ids and missing images are errors.",
    )
    p.add_argument("src", help="COCO folder: annotations/instances_<split>.json and <split>/ image folders")
    p.add_argument("dst", help="output directory for the shards and manifest.json")
    p.add_argument("--splits", nargs="+", default=None, help="splits to convert (default: every instances_*.json)")
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train image shuffle across shards (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    p.set_defaults(func=_coco_to_wds)


# -- registration -------------------------------------------------------------------------------

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_digits, _add_imagenet_to_wds, add_imagenet_to_ffcv, add_wds_to_ffcv, _add_shapes, _add_coco_to_wds,
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv data` and its sub-commands to the top-level CLI."""
    parser = subparsers.add_parser("data", help="prepare datasets (demo digits and shapes, ImageNet and COCO -> webdataset shards, ImageNet -> FFCV)")
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    for add in _COMMANDS:
        add(sub)

    def _help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)
