"""Every CondConv layer shape of CondConv-EfficientNet-B0 and CondConv-ResNet-50, timed side by side with the
static conv of the same shape and with timm's CondConv2d; prints ratios (markdown tables).

    python bench/condconv_layer.py --threads 1                 # CPU: batch-32 training, batch-1 inference
    python bench/condconv_layer.py --device cuda --dtype bfloat16 --train-batch 128
    python bench/condconv_layer.py --paths all                 # also every forced path (for tuning the rules)
    python bench/condconv_layer.py --quick                     # smoke run: small models, few repetitions

Training = forward + backward (gradients for input, routing weights and kernels); inference = forward
under ``torch.no_grad`` at batch 1. Shapes come from forward hooks on the models' CondConv2d modules.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import condconv  # noqa: E402
from condconv import CondConv2d  # noqa: E402
from condconv.condconv_paths import PATHS, heuristic_path, layer_geometry, legal_paths  # noqa: E402
from timing import env_line, geomean, interleaved, pick_clock, setup_threads, sync_fn  # noqa: E402

__all__ = ["LayerShape", "collect_shapes", "main"]


@dataclass(frozen=True)
class LayerShape:
    """One CondConv2d configuration and the input it sees (C, H, W), with how often it occurs in the model."""

    model: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    num_experts: int
    height: int
    width: int
    count: int = 1

    @property
    def label(self) -> str:
        """Short human-readable name: ``CinxHxW->Cout kK sS [dw|gG]``."""
        g = "" if self.groups == 1 else (" dw" if self.groups == self.in_channels else f" g{self.groups}")
        return f"{self.in_channels}x{self.height}x{self.width}->{self.out_channels} k{self.kernel_size} s{self.stride}{g}"


def collect_shapes(arch: str, num_experts: int, resolution: int, width_mult: float = 1.0) -> list[LayerShape]:
    """The distinct CondConv2d shapes of ``arch`` with ``num_experts`` (paper placement), in forward order."""
    model = condconv.create_model(arch, num_experts=num_experts, width_mult=width_mult).eval()
    seen: dict[tuple, int] = {}

    def hook(module: CondConv2d, args: tuple) -> None:
        x = args[0]
        key = (
            module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
            module.padding[0], module.groups, module.num_experts, x.shape[2], x.shape[3],
        )
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, CondConv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return [LayerShape(arch, *key, count=n) for key, n in seen.items()]


def _timm_layer(ours: CondConv2d) -> nn.Module:
    """timm's CondConv2d with the same experts (its weight is [E, out * in/g * kh * kw])."""
    from timm.layers import CondConv2d as TimmCondConv2d

    layer = TimmCondConv2d(
        ours.in_channels, ours.out_channels, ours.kernel_size, ours.stride, ours.padding, ours.dilation,
        ours.groups, bias=False, num_experts=ours.num_experts,
    )
    with torch.no_grad():
        layer.weight.copy_(ours.weight.reshape(ours.num_experts, -1))
    return layer


def _variants(
    shape: LayerShape, batch: int, train: bool, device: torch.device, dtype: torch.dtype, channels_last: bool,
    paths: Sequence[str], timm: bool,
) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Callables for static / ours (auto) / timm (/ each forced path), and the path auto picks."""
    torch.manual_seed(0)
    ours = CondConv2d(
        shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
        groups=shape.groups, num_experts=shape.num_experts,
    ).to(device, dtype)
    static = nn.Conv2d(
        shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
        groups=shape.groups, bias=False,
    ).to(device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, shape.in_channels, shape.height, shape.width, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(train)
    r = torch.sigmoid(torch.randn(batch, shape.num_experts, device=device, dtype=dtype)).requires_grad_(train)
    if channels_last:
        static = static.to(memory_format=torch.channels_last)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        if not train:
            def infer() -> None:
                with torch.no_grad():
                    fn()
            return infer

        def step() -> None:
            y = fn()
            y.backward(torch.ones_like(y))
        return step

    fns: dict[str, Callable[[], object]] = {"static": run(lambda: static(x)), "ours": run(lambda: ours(x, r))}
    # A reference for what mixing adds: the static conv plus the plain [B, E] @ [E, kernel] matmul that
    # mixes every example's kernel (reading all E experts' weights), each one torch op, with their
    # backward in training. At batch 1 the matmul is bound by memory bandwidth, not MADDs.
    flat_experts = ours.weight.detach().reshape(shape.num_experts, -1).requires_grad_(train)

    def conv_and_mix() -> None:
        y, kernels = static(x), r @ flat_experts
        if train:
            torch.autograd.backward([y, kernels], [torch.ones_like(y), torch.ones_like(kernels)])

    fns["static+mix"] = conv_and_mix if train else run(lambda: (static(x), r @ flat_experts)[0])
    if timm:
        theirs = _timm_layer(ours).to(device, dtype)
        fns["timm"] = run(lambda: theirs(x, r))
    geom, _ = layer_geometry(ours)
    info = {"auto": heuristic_path(geom, batch, shape.height, shape.width, train, device.type)}
    for p in paths:
        if p in legal_paths(geom):
            forced = CondConv2d(
                shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
                groups=shape.groups, num_experts=shape.num_experts, path=p,
            ).to(device, dtype)
            with torch.no_grad():
                forced.weight.copy_(ours.weight)
            fns[p] = run(lambda forced=forced: forced(x, r))
    return fns, info


def _fmt_ratio(t, name: str, reps: int) -> str:
    spread = t.ratio_iqr(name, "static")
    return f"{t.ratio(name, 'static'):.2f}" + (f" ±{spread / 2:.2f}" if reps >= 4 else "")


def run_mode(
    shapes: Sequence[LayerShape], mode: str, batch: int, args: argparse.Namespace, device: torch.device,
    dtype: torch.dtype, reps: int,
) -> dict[str, list[float]]:
    """Time every shape in one mode ("train" or "infer"), print a table, return ratios per variant."""
    train = mode == "train"
    sync = sync_fn(device)
    print(f"\n### {'training (fwd+bwd)' if train else 'inference (no_grad)'}, batch {batch}, {dtype}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {reps} interleaved repetitions\n")
    extra = list(PATHS) if args.paths == "all" else [p for p in args.paths.split(",") if p]
    header = ["layer (model, x count)", "static ms", "(static+mix)/static", "ours/static", "path"]
    header += ["timm/static", "ours/timm"] if args.timm else []
    header += [f"{p}/static" for p in extra]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    ratios: dict[str, list[float]] = {"ours": [], "timm": [], "ours_vs_timm": []}
    by_model: dict[str, list[float]] = {}
    losses_vs_timm = []
    floors: list[float] = []
    for shape in shapes:
        fns, info = _variants(shape, batch, train, device, dtype, args.channels_last, extra, args.timm)
        t = interleaved(fns, reps=reps, warmup=1, sync=sync, clock=args.clock)
        ours = t.ratio("ours", "static")
        ratios["ours"].append(ours)
        by_model.setdefault(shape.model, []).append(ours)
        floors.append(t.ratio("static+mix", "static"))
        row = [f"{shape.model} {shape.label} (x{shape.count})", f"{t.median('static') * 1e3:.2f}",
               _fmt_ratio(t, "static+mix", reps), _fmt_ratio(t, "ours", reps), info["auto"]]
        if args.timm:
            theirs = t.ratio("timm", "static")
            ratios["timm"].append(theirs)
            ratios["ours_vs_timm"].append(t.ratio("ours", "timm"))
            row.append(_fmt_ratio(t, "timm", reps))
            row.append(f"{t.ratio('ours', 'timm'):.2f}")
            if theirs > 1.5 and t.ratio("ours", "timm") >= 1.0:
                losses_vs_timm.append(shape.label)
        for p in extra:
            row.append(_fmt_ratio(t, p, reps) if p in t.seconds else "-")
        print("| " + " | ".join(row) + " |", flush=True)
    print()
    for model, vals in by_model.items():
        print(f"- {model}: geometric mean ours/static = {geomean(vals):.3f} over {len(vals)} shapes")
    print(f"- all shapes: geometric mean ours/static = {geomean(ratios['ours']):.3f}"
          + (f", timm/static = {geomean(ratios['timm']):.3f}, ours/timm = {geomean(ratios['ours_vs_timm']):.3f}"
             if args.timm else ""))
    print(f"- all shapes: geometric mean (static+mix)/static = {geomean(floors):.3f} (the static conv plus a plain "
          f"mixing matmul; ours/(static+mix) = {geomean(ratios['ours']) / geomean(floors):.3f})")
    if args.timm and train:
        slow = [r for r in ratios["timm"] if r > 1.5]
        print(f"- shapes where timm/static > 1.5: {len(slow)}; ours not faster than timm (median ours/timm >= 1) on: "
              f"{', '.join(losses_vs_timm) if losses_vs_timm else 'none'}")
    return ratios


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="efficientnet_b0,resnet50", help="comma-separated archs")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--train-batch", type=int, default=None, help="default 32 (CPU), 128 (CUDA)")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7 train, 21 infer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 (CPU), bfloat16 (CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "thread"],
                   help="auto: thread CPU time with --threads 1 on CPU, else wall (see bench/timing.py)")
    p.add_argument("--paths", default="", help="also time these forced paths (comma-separated, or 'all')")
    p.add_argument("--no-timm", dest="timm", action="store_false", help="skip timm's CondConv2d")
    p.add_argument("--quick", action="store_true", help="smoke run: small models/inputs, 1 repetition")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, list[float]]]:
    """Run the benchmark; returns {mode: {variant: ratios}}."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    train_batch = args.train_batch or (128 if device.type == "cuda" else 32)
    threads = setup_threads(args.threads)
    args.clock = pick_clock(args.clock, device)
    resolution, width = args.resolution, args.width_mult
    if args.quick:
        resolution, width, train_batch = min(resolution, 64), min(width, 0.25), min(train_batch, 2)
    shapes = [s for arch in args.models.split(",") for s in collect_shapes(arch, args.experts, resolution, width)]
    print(f"## CondConv2d layer benchmark: {args.experts} experts, {resolution}x{resolution} models, "
          f"{len(shapes)} distinct shapes")
    print(f"\n{env_line(device)}; command: `python bench/condconv_layer.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(f"Ratios are medians of within-repetition ratios; ± is half their interquartile range. "
          f"threads={threads}, clock={args.clock}")
    results = {}
    for mode in args.modes.split(","):
        batch = train_batch if mode == "train" else args.infer_batch
        reps = args.reps or (7 if mode == "train" else 21)
        if args.quick:
            reps = 1
        results[mode] = run_mode(shapes, mode, batch, args, device, dtype, reps)
    return results


if __name__ == "__main__":
    main()
