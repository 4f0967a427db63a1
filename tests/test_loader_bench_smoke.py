"""bench/loader.py still runs: --quick on 64 small synthetic photos (numbers are not asserted; they belong in
docs/benchmarks.md, not in timed tests). Named to run after test_data_ffcv.py, which imports ffcv already."""
from __future__ import annotations

import math

import pytest

from tests.test_bench_smoke import load_bench


def test_loader_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    results = load_bench("loader").main(["--quick", "--workers", "2"])
    out = capsys.readouterr().out
    assert "| pipeline | images/s | per core | / raw decode (PIL) |" in out
    assert "load average" in out
    (size,) = results
    rows = results[size]
    assert set(rows) == {"raw decode (PIL)", "raw decode (cv2)", "wds", "ffcv jpg"}
    assert rows["raw decode (PIL)"]["vs_raw"] == pytest.approx(1.0)
    assert rows["raw decode (PIL)"]["images"] == 64  # every file decoded once per repetition
    assert rows["wds"]["images"] == rows["ffcv jpg"]["images"] == 64  # 4 full batches of 16
    assert all(math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 for r in rows.values())
