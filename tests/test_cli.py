"""Tests for ecprune_onnx.cli: exit codes, messages and files, through the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from ecprune_onnx.cli import app
from ecprune_onnx.options import METHOD_NAMES

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SAMPLE_FILES = ("digits_mlp.onnx", "calib.npz", "test.npz")


def run_cli(*args: object) -> object:
    """Invoke the app in-process; stdout and stderr come back apart."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def assert_usage_error(result, culprit: str) -> None:
    """Exit 2, exactly one `error:` line on stderr that names `culprit`, no traceback."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert culprit in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with copies of the sample model and data; samples/ is never written."""
    for name in SAMPLE_FILES:
        shutil.copy(SAMPLES / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict:
    """One compress of the sample at ratio 0.5 to the default output path, with a report."""
    folder = tmp_path_factory.mktemp("pruned")
    for name in SAMPLE_FILES:
        shutil.copy(SAMPLES / name, folder / name)
    model, report = folder / "digits_mlp.onnx", folder / "report.json"
    result = run_cli(
        "compress", model, "--calib", folder / "calib.npz", "--ratio", 0.5, "--report", report
    )
    return {"result": result, "folder": folder, "model": model, "report": report}


# ------------------------------------------------------------------------------ compress


def test_compress_writes_the_default_output_and_a_report(pruned):
    result, folder = pruned["result"], pruned["folder"]
    assert result.exit_code == 0, result.output
    output = folder / "digits_mlp.pruned.onnx"
    assert output.is_file()
    onnx.checker.check_model(onnx.load(str(output)))
    assert result.stdout.strip() == f"wrote {output}"
    # The table and the summary lines go to stderr.
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    expected = ("/fc1/Gemm", "/fc3/Gemm", "total sparsity: 50.00%", f"device: {device}", "measured")
    for text in expected:
        assert text in result.stderr

    report = json.loads(pruned["report"].read_text())
    layers = report["layers"]
    assert [layer["name"] for layer in layers] == ["/fc1/Gemm", "/fc2/Gemm", "/fc3/Gemm"]
    total = sum(layer["weights"] for layer in layers)
    assert total == 128 * 64 + 128 * 128 + 10 * 128
    removed = sum(layer["removed"] for layer in layers)
    assert abs(removed - round(0.5 * total)) <= len(layers)
    for key in ("predicted_deviation", "measured_deviation", "measured_mse"):
        assert isinstance(report[key], float) and np.isfinite(report[key])
    assert report["output"] == str(output)


def test_compress_is_byte_identical_when_repeated_with_force(pruned):
    output = pruned["folder"] / "digits_mlp.pruned.onnx"
    first = output.read_bytes()
    result = run_cli(
        "compress",
        pruned["model"],
        "--calib",
        pruned["folder"] / "calib.npz",
        "--ratio",
        0.5,
        "--seed",
        0,
        "--force",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert output.read_bytes() == first


def test_compress_refuses_a_report_path_that_is_the_input_model(work):
    model = work / "digits_mlp.onnx"
    original = model.read_bytes()
    before = listing(work)
    result = run_cli(
        "compress", model, "--calib", work / "calib.npz", "--ratio", 0.5, "--report", model
    )
    assert_usage_error(result, "--report")
    assert model.read_bytes() == original
    assert listing(work) == before


# ------------------------------------------------------------------------------ evaluate


def evaluate_args(pruned: dict, *extra: object) -> list[object]:
    folder = pruned["folder"]
    return [
        "evaluate",
        pruned["model"],
        folder / "digits_mlp.pruned.onnx",
        "--data",
        folder / "test.npz",
        "--labels",
        "y",
        *extra,
    ]


def test_evaluate_passes_without_gates(pruned):
    result = run_cli(*evaluate_args(pruned))
    assert result.exit_code == 0, result.output
    assert "top-1 agreement on logits" in result.stderr
    assert "accuracy on logits: original" in result.stderr
    assert result.stdout.strip() == "no gates checked"


def test_evaluate_exits_1_when_a_gate_fails_and_reports_it(pruned, tmp_path):
    report = tmp_path / "evaluate.json"
    # The pruned sample's accuracy is below 100 %, so a minimum of 1.0 fails.
    result = run_cli(*evaluate_args(pruned, "--min-accuracy", 1.0, "--report", report))
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stderr and "min_accuracy" in result.stdout
    data = json.loads(report.read_text())
    gate = next(gate for gate in data["gates"] if gate["name"] == "min_accuracy")
    assert gate["passed"] is False
    assert data["passed"] is False


def test_evaluate_quiet_gate_failure_is_one_line_on_stderr(pruned):
    result = run_cli(*evaluate_args(pruned, "--min-accuracy", 1.0, "--quiet"))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("FAIL: min_accuracy") and result.stderr.count("\n") == 1


def test_evaluate_passing_gate_exits_0(pruned):
    result = run_cli(*evaluate_args(pruned, "--min-accuracy", 0.5, "--quiet"))
    assert result.exit_code == 0, result.output


def test_evaluate_refuses_an_accuracy_threshold_above_1(pruned):
    # The library treats thresholds outside [0, 1] as bad input, not as a failed gate.
    assert_usage_error(run_cli(*evaluate_args(pruned, "--min-accuracy", 1.01)), "--min-accuracy")


def test_evaluate_unknown_labels_key(pruned):
    result = run_cli(*evaluate_args(pruned)[:-1], "nosuchkey")
    assert_usage_error(result, "nosuchkey")


def test_evaluate_labels_with_other_row_count(pruned, work):
    data = work / "rows.npz"
    np.savez(data, x=np.zeros((10, 64), np.float32), y=np.zeros(9, np.int64))
    before = listing(work)
    folder = pruned["folder"]
    result = run_cli(
        "evaluate",
        pruned["model"],
        folder / "digits_mlp.pruned.onnx",
        "--data",
        data,
        "--labels",
        "y",
    )
    assert_usage_error(result, "9 rows")
    assert listing(work) == before


# ------------------------------------------------------------------------------- inspect


def test_inspect_lists_the_three_gemm_layers(work):
    result = run_cli("inspect", work / "digits_mlp.onnx")
    assert result.exit_code == 0, result.output
    for name in ("/fc1/Gemm", "/fc2/Gemm", "/fc3/Gemm"):
        assert name in result.stdout
    assert "[128, 64]" in result.stdout and "8,320" in result.stdout


def test_inspect_json(work):
    result = run_cli("inspect", work / "digits_mlp.onnx", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [layer["kind"] for layer in data["layers"]] == ["gemm"] * 3
    assert data["layers"][0]["shape"] == [128, 64]
    assert data["layers"][0]["parameters"] == 128 * 64 + 128
    assert data["skipped"] == []


def test_inspect_missing_model(work):
    assert_usage_error(run_cli("inspect", work / "nope.onnx"), "nope.onnx")


# ------------------------------------------------------------- compress with bad input


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def relu_model(path: Path) -> Path:
    """input → Relu → output: nothing to prune."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, path)
    return path


def bad_model(kind: str, work: Path) -> Path:
    if kind == "missing":
        return work / "absent.onnx"
    if kind == "random bytes":
        path = work / "random.onnx"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path
    if kind == "truncated":
        path = work / "truncated.onnx"
        whole = (work / "digits_mlp.onnx").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        return path
    return relu_model(work / "relu.onnx")


@pytest.mark.parametrize(
    ("kind", "culprit"),
    [
        ("missing", "absent.onnx"),
        ("random bytes", "random.onnx: not a readable ONNX model"),
        ("truncated", "truncated.onnx: not a readable ONNX model"),
        ("no dense layer", "no prunable dense layer"),
    ],
)
def test_compress_bad_model(work, kind, culprit):
    model = bad_model(kind, work)
    before = listing(work)
    result = run_cli("compress", model, "--calib", work / "calib.npz", "--ratio", 0.5)
    assert_usage_error(result, culprit)
    assert listing(work) == before


def bad_calib(kind: str, work: Path) -> Path:
    rows = np.zeros((10, 64), np.float32)
    if kind == "missing":
        return work / "absent.npz"
    if kind == "not an npz":
        path = work / "text.npz"
        path.write_text("x,y\n1,2\n")
        return path
    if kind == "object array":
        return write_npz(work / "pickled.npz", x=np.array([{"a": 1}] * 10, dtype=object))
    if kind == "no input array":
        return write_npz(work / "named.npz", z=rows, w=rows)
    if kind == "float64":
        return write_npz(work / "double.npz", x=rows.astype(np.float64))
    if kind == "static dimension":
        return write_npz(work / "narrow.npz", x=np.zeros((10, 63), np.float32))
    if kind == "zero rows":
        return write_npz(work / "empty.npz", x=np.zeros((0, 64), np.float32))
    nan_rows = rows.copy()
    nan_rows[3, 5] = np.nan
    return write_npz(work / "nan.npz", x=nan_rows)


@pytest.mark.parametrize(
    ("kind", "culprit"),
    [
        ("missing", "absent.npz"),
        ("not an npz", "is not an NPZ file"),
        ("object array", "Python objects"),
        ("no input array", "no array for model input 'x'"),
        ("float64", "dtype float64"),
        ("static dimension", "[10, 63]"),
        ("zero rows", "0 rows"),
        ("nan", "non-finite"),
    ],
)
def test_compress_bad_calibration_data(work, kind, culprit):
    calib = bad_calib(kind, work)
    before = listing(work)
    result = run_cli("compress", work / "digits_mlp.onnx", "--calib", calib, "--ratio", 0.5)
    assert_usage_error(result, culprit)
    assert listing(work) == before


UNITS = ["--structure", "neuron", "--ratio", "0.3"]


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        (["--ratio", "1.0"], "--ratio 1.0"),
        (["--ratio", "-0.1"], "--ratio -0.1"),
        (["--pattern", "2-4"], "--pattern 2-4"),
        (["--pattern", "5:4"], "--pattern 5:4"),
        (["--ratio", "0.5", "--output", "nosuchtensor"], "nosuchtensor"),
        (["--ratio", "0.5", "--method", "nosuchmethod"], "nosuchmethod"),
        (["--ratio", "0.5", "--method", "ec", "--budget", "guessed"], "--budget guessed"),
        (["--ratio", "0.5", "--weight-ratio", "0.5"], "--weight-ratio 0.5: only with --structure"),
        ([*UNITS, "--weight-ratio", "1.5"], "--weight-ratio 1.5"),
        ([*UNITS, "--weight-method", "ec"], "--weight-method ec"),
        ([*UNITS, "--weight-ratio", "0.5", "--weight-method", "nosuch"], "--weight-method nosuch"),
    ],
)
def test_compress_bad_options(work, options, culprit):
    before = listing(work)
    result = run_cli("compress", work / "digits_mlp.onnx", "--calib", work / "calib.npz", *options)
    assert_usage_error(result, culprit)
    assert listing(work) == before


def test_compress_keeps_an_existing_output_without_force(work):
    output = work / "digits_mlp.pruned.onnx"
    output.write_bytes(b"keep me")
    before = listing(work)
    result = run_cli(
        "compress", work / "digits_mlp.onnx", "--calib", work / "calib.npz", "--ratio", 0.5
    )
    assert_usage_error(result, "--force")
    assert output.read_bytes() == b"keep me"
    assert listing(work) == before


def test_compress_refuses_to_overwrite_its_input(work):
    model = work / "digits_mlp.onnx"
    original = model.read_bytes()
    before = listing(work)
    result = run_cli(
        "compress", model, "--calib", work / "calib.npz", "--ratio", 0.5, "-o", model, "--force"
    )
    assert_usage_error(result, "overwrite the input")
    assert model.read_bytes() == original
    assert listing(work) == before


def test_compress_output_folder_must_exist(work):
    before = listing(work)
    result = run_cli(
        "compress",
        work / "digits_mlp.onnx",
        "--calib",
        work / "calib.npz",
        "--ratio",
        0.5,
        "-o",
        work / "nofolder" / "out.onnx",
    )
    assert_usage_error(result, "nofolder")
    assert listing(work) == before


def test_click_usage_errors_keep_exit_2(work):
    result = run_cli("compress", work / "digits_mlp.onnx", "--ratio", "half")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# --------------------------------------------------------------- error mapping in the CLI


def test_debug_reraises_usage_errors(work):
    result = run_cli("inspect", work / "nope.onnx", "--debug")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "UsageError"


def test_file_errors_from_the_library_exit_2(work, monkeypatch):
    import ecprune_onnx.evaluate  # noqa: F401  (the command imports it when it runs)

    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "weights.data")

    monkeypatch.setattr(sys.modules["ecprune_onnx.evaluate"], "evaluate", missing)
    result = run_cli(
        "evaluate", work / "digits_mlp.onnx", work / "digits_mlp.onnx", "--data", work / "test.npz"
    )
    assert_usage_error(result, "weights.data: No such file or directory")


def test_interrupt_exits_130(work, monkeypatch):
    import ecprune_onnx.compress  # noqa: F401  (the command imports it when it runs)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["ecprune_onnx.compress"], "compress", interrupted)
    result = run_cli("compress", work / "digits_mlp.onnx", "--ratio", 0.5)
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"


def test_version():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("ecprune-onnx ")


# ----------------------------------------------------------------- real processes

HEAVY_MODULES = ("torch", "onnx", "onnxruntime", "onnx2pytorch", "numpy")


def test_importing_the_cli_loads_no_heavy_library():
    # `ecprune-onnx --help` and input errors answer in a fraction of a second only while
    # the libraries that take seconds to import wait for a command that needs them.
    code = (
        "import sys, ecprune_onnx.cli; "
        f"print(' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == []


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["compress", "absent.onnx", "--ratio", "0.5"], "absent.onnx: model file not found"),
        (["compress", "{model}", "--ratio", "2"], "--ratio 2.0"),
        (["compress", "{model}", "--calib", "absent.npz", "--ratio", "0.5"], "--calib absent"),
        (["compress", "{model}", "--ratio", "0.5", "--method", "ecx"], "--method ecx"),
        (["evaluate", "{model}", "{model}", "--data", "absent.npz"], "--data absent.npz"),
        (["inspect", "absent.onnx"], "absent.onnx"),
    ],
)
def test_input_errors_are_refused_before_the_library_loads(args, culprit):
    model = str(SAMPLES / "digits_mlp.onnx")
    argv = [arg.replace("{model}", model) for arg in args]
    code = (
        "import sys\nfrom ecprune_onnx.cli import main\n"
        "sys.argv = ['ecprune-onnx', *sys.argv[1:]]\n"
        "try:\n    main()\n"
        f"finally:\n    print(' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [completed.stderr.splitlines()[0]]
    assert culprit in completed.stderr
    assert completed.stdout.split() == []  # no heavy module was imported


def test_help_reads_at_80_columns_without_a_terminal():
    # Piped output in a CI log: no box characters, no method name cut across lines.
    environment = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    completed = subprocess.run(
        [sys.executable, "-m", "ecprune_onnx", "compress", "--help"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "Usage: ecprune-onnx compress [OPTIONS] MODEL" in text
    assert not set("╭│╰─") & set(text)
    words = set(" ".join(lines).replace(",", " ").split())
    for method in METHOD_NAMES:
        assert method in words, method
    assert "[required unless --pattern]" in " ".join(" ".join(lines).split())


def test_python_dash_m_help():
    completed = subprocess.run(
        [sys.executable, "-m", "ecprune_onnx", "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    for command in ("compress", "evaluate", "inspect"):
        assert command in completed.stdout


def test_installed_script_reports_bad_input_in_one_line(tmp_path):
    script = shutil.which("ecprune-onnx", path=str(Path(sys.executable).parent))
    assert script is not None, "the ecprune-onnx console script is not installed"
    completed = subprocess.run(
        [script, "inspect", str(tmp_path / "absent.onnx")],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.splitlines() == [
        f"error: {tmp_path / 'absent.onnx'}: model file not found"
    ]


def test_quiet_evaluate_prints_nothing_on_stderr(pruned):
    # A real process: onnxruntime's C++ logger writes to file descriptor 2, not sys.stderr,
    # and a failed CUDA probe on a machine without a driver must not show up there.
    folder = pruned["folder"]
    completed = subprocess.run(
        [sys.executable, "-m", "ecprune_onnx", *map(str, evaluate_args(pruned)), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert completed.stdout == ""
    assert (folder / "digits_mlp.pruned.onnx").is_file()


def test_compress_without_calibration_says_the_deviation_was_not_measured(work):
    result = run_cli("compress", work / "digits_mlp.onnx", "--ratio", 0.5, "--method", "magnitude")
    assert result.exit_code == 0, result.output
    assert "output deviation: not measured (no calibration data given)" in result.stderr
    assert "0 calibration rows" not in result.stderr


def test_command_list_and_arguments_read_whole_at_80_columns():
    environment = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}

    def help_text(*args: str) -> str:
        command = [sys.executable, "-m", "ecprune_onnx", *args, "--help"]
        return subprocess.run(command, capture_output=True, text=True, env=environment).stdout

    assert "..." not in help_text().split("Commands:")[1]  # no description cut short
    assert "Usage: ecprune-onnx evaluate [OPTIONS] ORIGINAL PRUNED" in help_text("evaluate")


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["compress", "model.onnx", "--ratio", "half"], "'--ratio'"),
        (["evaluate", "a.onnx", "b.onnx", "--bogus"], "--bogus"),
        (["inspect"], "'MODEL'"),
    ],
    ids=["value that does not parse", "unknown option", "missing argument"],
)
def test_options_that_do_not_parse_end_in_one_error_line(args, culprit):
    # click would print its usage block of three lines; every other bad input gets one
    result = run_cli(*args)
    assert_usage_error(result, culprit)
    assert f"see 'ecprune-onnx {args[0]} --help'" in result.stderr
