"""Statistics in groups of layers (grouping.py): the same written model as one pass."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecprune_onnx import grouping
from ecprune_onnx.cli import app
from ecprune_onnx.compress import compress
from ecprune_onnx.errors import UsageError
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.modelio import load_model
from ecprune_onnx.options import parse_memory

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# The sample MLP's layers: 128×64, 128×128, 10×128 weights; S1 and S2 16 bytes each.
SUM_BYTES = [16 * 128 * 64, 16 * 128 * 128, 16 * 10 * 128]


def test_groups_hold_consecutive_layers_that_fit():
    layers = find_dense_layers(load_model(SAMPLES / "digits_mlp.onnx")).layers
    assert [grouping._sum_bytes(layer, 2) for layer in layers] == SUM_BYTES
    plan = grouping.plan_groups(layers, SUM_BYTES[1] + SUM_BYTES[2], with_gradient=False)
    assert [[layer.name for layer in group] for group in plan.groups] == [
        [layers[0].name],
        [layers[1].name, layers[2].name],
    ]
    one = grouping.plan_groups(layers, sum(SUM_BYTES), with_gradient=False)
    assert one.passes == 1
    # a layer above the budget on its own still gets a pass (its sums are needed whole)
    assert grouping.plan_groups(layers, 1, with_gradient=False).passes == 3


@pytest.mark.parametrize(
    ("method", "probes", "steps"), [("ec", 16, 1), ("ec", 4, 2), ("wanda", 16, 1)]
)
def test_grouped_passes_write_the_same_file_as_one(tmp_path, method, probes, steps):
    """Exact probes and Hutchinson's (seeded, drawn again each pass), and --steps rounds."""

    def run(name, max_memory):
        out = tmp_path / f"{name}.onnx"
        result = compress(
            SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.6, output=out,
            method=method, probes=probes, steps=steps, max_memory=max_memory,
        )  # fmt: skip
        return result, out.read_bytes()

    one, one_bytes = run("one", None)
    grouped, grouped_bytes = run("grouped", SUM_BYTES[1])
    assert grouped_bytes == one_bytes
    assert grouped.predicted_deviation == one.predicted_deviation
    assert not any("passes" in note for note in one.notes)
    (note,) = [note for note in grouped.notes if "passes" in note]
    assert note.startswith("statistics in 3 passes over the calibration data")
    assert "--max-memory" in note


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_a_full_disk_for_the_grouped_sums_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    # the sums are memory-mapped: without their space reserved first, a full disk would
    # surface as SIGBUS on some later write instead of one error line
    def full(handle, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "grouped.onnx"
    with pytest.raises(UsageError, match="temporary files in .*No space left on device"):
        compress(
            SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.6, output=out,
            method="ec", max_memory=SUM_BYTES[1],
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_reconstructions_sum_s0_alone_and_need_no_groups(tmp_path):
    result = compress(
        SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5,
        output=tmp_path / "ecr.onnx", method="ecr", max_memory=1,
    )  # fmt: skip
    assert not any("passes" in note for note in result.notes)


@pytest.mark.parametrize(
    ("text", "size"), [("8G", 8 * 1024**3), ("1.5GiB", 3 * 1024**3 // 2), ("512m", 512 * 1024**2),
                       ("2e9", 2 * 10**9), ("100KB", 102400)],
)  # fmt: skip
def test_memory_sizes_parse(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "lots", "nanG", "0"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(UsageError, match="--max-memory"):
        parse_memory(text)


def test_cli_refuses_a_bad_size_with_one_line_and_no_file(tmp_path):
    out = tmp_path / "p.onnx"
    result = CliRunner().invoke(
        app,
        ["compress", str(SAMPLES / "digits_mlp.onnx"), "--calib", str(SAMPLES / "calib.npz"),
         "--ratio", "0.5", "-o", str(out), "--max-memory", "lots"],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-memory lots")
    assert not out.exists()


def test_cli_takes_the_size(tmp_path):
    out = tmp_path / "p.onnx"
    args = ["compress", str(SAMPLES / "digits_mlp.onnx"), "--calib", str(SAMPLES / "calib.npz")]
    args += ["--ratio", "0.5", "--method", "ec", "-o", str(out), "--max-memory", "300K"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "statistics in 2 passes" in result.output
    assert out.exists()
