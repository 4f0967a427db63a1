"""`condconv madds`: the paper's table by default, markdown or CSV, one-line errors."""
from __future__ import annotations

import csv
import io

import pytest

from pipeline.cli import main


def test_no_arguments_print_paper_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["madds"]) == 0
    out = capsys.readouterr().out
    assert "| arch | static_madds_m | paper_static_madds_m |" in out
    for arch in ("mobilenet_v1", "mobilenet_v2", "mnasnet_a1", "resnet50", "efficientnet_b0"):
        assert f"| {arch} |" in out
    assert "| 413 |" in out  # the paper's CondConv B0 number sits next to ours


def test_csv_for_given_grid(capsys: pytest.CaptureFixture) -> None:
    args = ["madds", "--arch", "mobilenet_v1", "--width", "0.25", "0.5", "--experts", "0", "4",
            "--placement", "paper", "last:2", "--resolution", "64", "--csv"]
    assert main(args) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # 2 widths x (static once + 2 placements x 4 experts)
    assert [r["model"] for r in rows] == [
        "mobilenet_v1-w0.25-e0", "mobilenet_v1-w0.25-e4-paper", "mobilenet_v1-w0.25-e4-last2",
        "mobilenet_v1-w0.5-e0", "mobilenet_v1-w0.5-e4-paper", "mobilenet_v1-w0.5-e4-last2",
    ]
    assert all(float(r["madds_m"]) > 0 for r in rows)


def test_block_index_placement_and_summary(capsys: pytest.CaptureFixture) -> None:
    assert main(["madds", "--arch", "resnet50", "--width", "0.25", "--experts", "2", "--placement", "14,15,fc",
                 "--summary"]) == 0
    out = capsys.readouterr().out
    assert "resnet50-w0.25-e2-b14.15.fc" in out
    assert "| blocks.15 | Bottleneck | yes | 2 |" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arch", "vgg"], "unknown arch 'vgg'"),
        (["--arch", "mobilenet_v1", "--experts", "4", "--placement", "3,99"], "block 99"),
        (["--arch", "mobilenet_v1", "--width", "0"], "width_mult=0.0"),
    ],
)
def test_bad_input_is_one_line_error(args: list, message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["madds", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
