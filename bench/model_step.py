"""CondConv models against their static twins: training-step time, batch-1 inference time and the peak memory
of a training step, all measured side by side (interleaved repetitions); timm's CondConv-EfficientNet-B0
(`efficientnet_cc_b0_8e` / `_4e`) and its static B0 are timed in the same repetitions for comparison.

    python bench/model_step.py --threads 1                                   # CPU
    python bench/model_step.py --device cuda --dtype bfloat16 --train-batch 128
    python bench/model_step.py --quick                                       # smoke run

Train step = forward, cross-entropy, backward, SGD(momentum) step. Inference = eval mode, no_grad, batch 1.
Peak memory: each model in its own process; CPU: peak resident memory during a steady-state training
step (``VmHWM`` after resetting it through /proc/self/clear_refs) minus the process's memory before the
model was built, so parameters, gradients, optimizer state and activations count, the torch runtime
does not; CUDA: ``torch.cuda.max_memory_allocated`` of a step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import condconv  # noqa: E402
from timing import env_line, interleaved, pick_clock, setup_threads, sync_fn  # noqa: E402

__all__ = ["build_model", "main"]

_TIMM_CC = {4: "efficientnet_cc_b0_4e", 8: "efficientnet_cc_b0_8e"}


def build_model(name: str, experts: int, width_mult: float) -> nn.Module:
    """``ours:<arch>`` (condconv.create_model; experts 0 = static) or ``timm:efficientnet_b0`` (experts 0) /
    timm's CondConv B0 with ``experts`` experts."""
    source, arch = name.split(":")
    if source == "ours":
        return condconv.create_model(arch, num_experts=experts, width_mult=width_mult)
    import timm

    return timm.create_model(_TIMM_CC[experts] if experts else arch, pretrained=False)


def _variants(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, model name, experts) for every model to run."""
    out = []
    for arch in args.models.split(","):
        out += [(f"{arch} static", f"ours:{arch}", 0), (f"{arch} CondConv-{args.experts}e", f"ours:{arch}", args.experts)]
        if args.timm and arch == "efficientnet_b0" and args.experts in _TIMM_CC and args.width_mult == 1.0:
            out += [("timm efficientnet_b0", "timm:efficientnet_b0", 0),
                    (f"timm {_TIMM_CC[args.experts]}", "timm:efficientnet_b0", args.experts)]
    return out


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    return step


def _infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def _inputs(batch: int, resolution: int, device: torch.device, dtype: torch.dtype, channels_last: bool):
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (batch,), device=device)


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    model = model.to(device, dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args: argparse.Namespace, name: str, experts: int) -> float:
    """Peak MiB of one steady-state training step of one model (run in a fresh process)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    x, y = _inputs(args.memory_batch, args.resolution, device, dtype, args.channels_last)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
    else:
        before = _status_kb("VmRSS")
    model = _prepare(build_model(name, experts, args.width_mult), device, dtype, args.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = _train_step(model, x, y, opt)
    step()  # first step: optimizer state, allocator warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return (_status_kb("VmHWM") - before) / 1024


def _memory_table(args: argparse.Namespace, variants: list[tuple[str, str, int]], argv: Sequence[str]) -> dict[str, float]:
    print(f"\n### peak memory of a training step, batch {args.memory_batch} (one process per model)\n")
    peaks = {}
    for label, name, experts in variants:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--probe-memory", f"{name}={experts}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[label] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    print("| model | peak MiB | / static twin |")
    print("|---|---|---|")
    for label, name, experts in variants:
        twin = next(lab for lab, n, e in variants if n == name and e == 0)
        print(f"| {label} | {peaks[label]:.0f} | {peaks[label] / peaks[twin]:.3f} |")
    return peaks


def _time_table(
    title: str, fns: dict[str, Callable[[], None]], variants: list[tuple[str, str, int]], reps: int,
    args: argparse.Namespace, device: torch.device,
) -> dict[str, float]:
    print(f"\n### {title}, {reps} interleaved repetitions\n")
    t = interleaved(fns, reps=reps, warmup=1, sync=sync_fn(device), clock=args.clock)
    print("| model | median ms | / static twin | ± (half IQR) |")
    print("|---|---|---|---|")
    ratios = {}
    for label, name, experts in variants:
        twin = next(lab for lab, n, e in variants if n == name and e == 0)
        ratios[label] = t.ratio(label, twin)
        spread = t.ratio_iqr(label, twin) / 2 if reps >= 4 else 0.0
        print(f"| {label} | {t.median(label) * 1e3:.1f} | {ratios[label]:.3f} | {spread:.3f} |")
    ours_cc = [lab for lab, n, e in variants if n.startswith("ours") and e]
    timm_cc = [lab for lab, n, e in variants if n.startswith("timm") and e]
    if ours_cc and timm_cc:
        print(f"\n- timm CondConv model / ours: {t.ratio(timm_cc[0], ours_cc[0]):.3f} (time)")
    return ratios


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="efficientnet_b0,resnet50")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=None, help="default 16 (CPU), 128 (CUDA)")
    p.add_argument("--memory-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=None, help="default 5 train, 21 inference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 (CPU), bfloat16 (CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "thread"])
    p.add_argument("--no-timm", dest="timm", action="store_false")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--quick", action="store_true", help="smoke run: width 0.25, 64x64, batch 2, 1 repetition")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.quick:
        args.width_mult, args.resolution = min(args.width_mult, 0.25), min(args.resolution, 64)
        args.train_batch, args.memory_batch, args.reps = 2, 2, 1
    args.train_batch = args.train_batch or (128 if args.device == "cuda" else 16)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    """Run the benchmark; returns {"train"|"infer"|"memory": {model label: value}}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    if args.probe_memory:
        name, experts = args.probe_memory.split("=")
        print(json.dumps({"peak_mib": memory_probe(args, name, int(experts))}))
        return {}
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.clock = pick_clock(args.clock, device)
    dtype = getattr(torch, args.dtype)
    variants = _variants(args)
    print(f"## Model benchmark: CondConv ({args.experts} experts) vs static, {args.resolution}x{args.resolution}, "
          f"width {args.width_mult}, {args.dtype}{', channels_last' if args.channels_last else ''}")
    print(f"\n{env_line(device)}; clock={args.clock}; command: `python bench/model_step.py {' '.join(argv)}`")
    results: dict[str, dict[str, float]] = {}
    models = {label: _prepare(build_model(name, e, args.width_mult), device, dtype, args.channels_last)
              for label, name, e in variants}
    if "train" in args.modes:
        x, y = _inputs(args.train_batch, args.resolution, device, dtype, args.channels_last)
        fns = {}
        for label, model in models.items():
            model.train()
            fns[label] = _train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))
        results["train"] = _time_table(f"training step, batch {args.train_batch}", fns, variants,
                                       args.reps or 5, args, device)
    if "infer" in args.modes:
        x, _ = _inputs(1, args.resolution, device, dtype, args.channels_last)
        fns = {label: _infer(model.eval(), x) for label, model in models.items()}
        results["infer"] = _time_table("inference, batch 1", fns, variants, args.reps or 21, args, device)
    del models
    if args.memory:
        results["memory"] = _memory_table(args, variants, argv)
    return results


if __name__ == "__main__":
    main()
