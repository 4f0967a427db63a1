"""`condconv routing CHECKPOINT --data DIR`: the routing report of a trained model on a val split.

Loads a Lightning checkpoint written by `condconv fit` with ``torch.load(weights_only=True)``
(its hyperparameters are plain data), rebuilds the model from ``hyper_parameters["model"]`` (the
`condconv.ModelSpec` as a dict), runs it over the val split of a `ShardDataModule` and writes the
report of `pipeline.routing_report` (PNG figures, ``routing_stats.csv``, ``index.html``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

__all__ = ["register", "load_model_from_checkpoint", "main_routing", "DEFAULT_OUT_ROOT"]

DEFAULT_OUT_ROOT = Path("outputs/routing")
_PREFIXES = {False: "model.", True: "model_ema.module."}  # ClassificationModule's submodule names


def load_model_from_checkpoint(path: str | Path, ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a `ClassificationModule` checkpoint (its EMA weights with ``ema``) and the checkpoint's hparams."""
    import condconv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters") or {}
    spec_fields = hparams.get("model")
    if not isinstance(spec_fields, Mapping):
        raise ValueError(f"{path}: no model spec in hyper_parameters['model']; expected a `condconv fit` checkpoint")
    model = condconv.create_model(condconv.ModelSpec(**spec_fields))
    prefix = _PREFIXES[ema]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        what = "EMA weights (model_ema.module.*): the run had no ema_decay" if ema else "weights under model.*"
        raise ValueError(f"{path}: no {what}")
    model.load_state_dict(state)
    model.eval()
    return model, checkpoint


def main_routing(
    checkpoint: str,
    data: str,
    out: Optional[str] = None,
    max_batches: Optional[int] = None,
    batch_size: int = 64,
    ema: bool = False,
) -> int:
    """Write the routing report of ``checkpoint`` on the val split of the shards in ``data``; prints the table."""
    from pipeline.data import ShardDataModule
    from pipeline.routing_report import routing_report

    if max_batches is not None and max_batches < 1:
        raise ValueError(f"--max-batches={max_batches}; expected an int >= 1")
    model, ckpt = load_model_from_checkpoint(checkpoint, ema=ema)
    spec = model.spec
    # The val framing of the training run (image size, resize), when the checkpoint recorded it.
    dm_hparams = ckpt.get("datamodule_hyper_parameters") or {}
    image_size = int(dm_hparams.get("image_size") or spec.resolution)
    datamodule = ShardDataModule(
        data, batch_size=batch_size, num_workers=0, image_size=image_size, val_resize=dm_hparams.get("val_resize"),
    )
    if datamodule.num_classes != spec.num_classes:
        raise ValueError(
            f"the model has num_classes={spec.num_classes} but the data at {data} has {datamodule.num_classes}"
        )
    out_dir = Path(out) if out else DEFAULT_OUT_ROOT / (spec.name + ("-ema" if ema else ""))
    with torch.no_grad():
        stats, paths = routing_report(
            model, datamodule.dataloader("val"), out_dir, num_classes=spec.num_classes,
            class_names=datamodule.classes, max_batches=max_batches,
            title=f"Routing report: {spec.name}{' (EMA)' if ema else ''}",
            notes=[f"Checkpoint: {checkpoint} (epoch {ckpt.get('epoch', '?')}); data: {data} (val split)."],
        )
    print(f"{'depth':>5}  {'layer':<32} {'experts':>7} {'specificity':>11} {'bimodality':>10} {'near 0/1':>8}")
    for s in stats:
        print(f"{s.depth:>5}  {s.name:<32} {s.num_experts:>7} {s.specificity:>11.3f} {s.bimodality:>10.3f} "
              f"{s.extreme_fraction:>8.3f}")
    print(f"\n{stats[0].num_examples} examples; report: {paths['index.html']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return main_routing(args.checkpoint, args.data, args.out, args.max_batches, args.batch_size, args.ema)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv routing`."""
    p = subparsers.add_parser(
        "routing",
        help="routing report of a trained model: class specificity and bimodality per layer (PNGs + HTML)",
        description="Run a `condconv fit` checkpoint over the val split of webdataset shards, record every "
        "routing function's weights and write per-layer statistics, figures and index.html.",
    )
    p.add_argument("checkpoint", help="a .ckpt written by `condconv fit` (e.g. outputs/checkpoints/<run>/last.ckpt)")
    p.add_argument("--data", required=True, help="shard folder with manifest.json (as data.data_dir of the fit)")
    p.add_argument("--out", help=f"report folder (default: {DEFAULT_OUT_ROOT}/<model name>)")
    p.add_argument("--max-batches", type=int, default=None, help="analyze at most this many val batches (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="val batch size (default 64)")
    p.add_argument("--ema", action="store_true", help="analyze the EMA weights instead of the trained ones")
    p.set_defaults(func=_run)
