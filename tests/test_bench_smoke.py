"""The benchmarks still run: each in --quick mode on tiny settings (numbers are not asserted; they belong in
docs/benchmarks.md, not in timed tests)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """Import bench/<name>.py as a module (bench/ is scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_layer_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("condconv_layer")
    results = bench.main(["--quick", "--models", "efficientnet_b0", "--paths", "all"])
    out = capsys.readouterr().out
    assert ("| layer (model, x count) | static ms | (static+mix)/static | ours/static | path | timm/static "
            "| ours/timm |") in out
    assert "geometric mean ours/static" in out and "geometric mean (static+mix)/static" in out
    n_shapes = len(bench.collect_shapes("efficientnet_b0", 8, 64, 0.25))
    for mode in ("train", "infer"):
        assert len(results[mode]["ours"]) == len(results[mode]["timm"]) == n_shapes
        assert all(math.isfinite(r) and r > 0 for r in results[mode]["ours"])


def test_layer_shapes_come_from_the_models() -> None:
    bench = load_bench("condconv_layer")
    b0 = bench.collect_shapes("efficientnet_b0", 8, 224)
    r50 = bench.collect_shapes("resnet50", 8, 224)
    # CondConv-B0 (last 8 MBConv blocks) and CondConv-ResNet-50 (conv5_x), deduplicated
    assert len(b0) == 13 and sum(s.count for s in b0) == 24
    assert len(r50) == 6 and sum(s.count for s in r50) == 10
    assert any(s.label == "1152x7x7->1152 k5 s1 dw" for s in b0)
    assert any(s.label == "512x7x7->512 k3 s1" for s in r50)


def test_model_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("model_step")
    # The memory table runs one process per model (~6 s each to import torch): its probe is tested
    # in-process below.
    results = bench.main(["--quick", "--models", "efficientnet_b0", "--no-memory"])
    out = capsys.readouterr().out
    assert "### training step, batch 2" in out and "### inference, batch 1" in out
    labels = {"efficientnet_b0 static", "efficientnet_b0 CondConv-8e"}
    for kind in ("train", "infer"):
        assert set(results[kind]) == labels
        assert all(v > 0 for v in results[kind].values())


def test_model_memory_probe_quick() -> None:
    # In a fresh process, as the benchmark runs it: inside pytest, memory freed by earlier tests is
    # reused, so the resident-set peak need not grow at all.
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "bench" / "model_step.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--probe-memory", "ours:efficientnet_b0=8"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    peak = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    assert 0 < peak < 4096
