"""Compress every corpus model (benchmarks/corpus.py) with the package's Python API.

    python benchmarks/corpus_run.py [--corpus DIR] [--only NAME,...] [--quick]

For each model, method (ecr, ec, magnitude, sparsegpt) and ratio (0.5, 0.7): calls
`ecprune_onnx.compress`, catching any exception and recording its type and message; on
success records the layers found / pruned / skipped (with reasons), compress time, the
parity and predicted / measured deviations it reports, and, measured here with
onnxruntime on the test NPZ, the top-1 agreement and the output MSE of the model's `y`
against the original, and the task accuracy where the test file has labels.
--quick: the corpus' quick models only, methods ecr and magnitude, ratio 0.5.

The package is imported from this checkout (ROOT), whichever copy is installed; results
name its path and git commit. Writes benchmarks/results/corpus.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ecprune_onnx  # noqa: E402
from benchmarks.corpus import (  # noqa: E402
    DEFAULT_OUT,
    QUICK_MODELS,
    Entry,
    first_lines,
    load_manifest,
    onnxruntime_outputs,
)
from ecprune_onnx import compress  # noqa: E402
from ecprune_onnx.layers import find_dense_layers  # noqa: E402
from ecprune_onnx.modelio import load_model  # noqa: E402
from ecprune_onnx.normalize import normalize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("ecr", "ec", "magnitude", "sparsegpt")
RATIOS = (0.5, 0.7)
QUICK_METHODS = ("ecr", "magnitude")
QUICK_RATIOS = (0.5,)


@dataclass
class Run:
    method: str
    ratio: float
    ok: bool
    error: str | None = None  # "Type: message" when compress raised
    seconds: float | None = None
    layers_pruned: int | None = None
    sparsity: float | None = None
    parity_deviation: float | None = None
    predicted_deviation: float | None = None
    measured_mse: float | None = None  # compress' own, on the calibration set
    top1_agreement: float | None = None  # on the test NPZ, y's argmax over its last axis
    output_mse: float | None = None
    output_rel: float | None = None  # ||pruned - original|| / ||original||
    accuracy: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelRuns:
    name: str
    exporter: str
    y: str | None
    layers_found: int | None = None
    skipped: list[str] = field(default_factory=list)  # "node (op): reason"
    scan_error: str | None = None
    original_accuracy: float | None = None
    runs: list[Run] = field(default_factory=list)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_lines(str(error), 500)}"


def test_feeds(corpus: Path, entry: Entry) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(corpus / entry.test) as arrays:
        feeds = {key: arrays[key] for key in arrays if key != entry.labels}
        labels = arrays[entry.labels] if entry.labels else None
    return feeds, labels


def y_output(path: Path, entry: Entry, feeds: dict[str, np.ndarray]) -> np.ndarray:
    outputs = onnxruntime_outputs(path, feeds)
    return outputs[entry.outputs.index(entry.y)]


def compare(original: np.ndarray, pruned: np.ndarray, entry: Entry, labels, run: Run) -> None:
    difference = pruned.astype(np.float64) - original
    run.output_mse = float(np.mean(difference**2))
    run.output_rel = float(np.linalg.norm(difference) / max(np.linalg.norm(original), 1e-30))
    if entry.task.startswith("features"):
        return  # a hidden state has no classes to agree on
    run.top1_agreement = float(np.mean(pruned.argmax(-1) == original.argmax(-1)))
    if labels is not None:
        run.accuracy = float(np.mean(pruned.argmax(-1) == labels))


def compress_once(corpus: Path, entry: Entry, method: str, ratio: float, work: Path) -> Run:
    run = Run(method, ratio, ok=False)
    output = work / f"{entry.name}.{method}.{ratio}.onnx"
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compress(
                corpus / entry.file, corpus / entry.calib, ratio, method=method,
                output=output, outputs=[entry.y], force=True,
            )  # fmt: skip
    except Exception as error:  # every failure is a finding for the core
        run.error = error_text(error)
        run.seconds = round(time.perf_counter() - started, 2)
        return run
    run.ok = True
    run.seconds = round(result.seconds, 2)
    run.layers_pruned = sum(layer.removed > 0 for layer in result.layers)
    run.sparsity = result.sparsity
    run.parity_deviation = result.parity_deviation
    run.predicted_deviation = result.predicted_deviation
    run.measured_mse = result.measured_mse
    run.notes = list(result.notes)
    return run


def scan(corpus: Path, entry: Entry, record: ModelRuns) -> None:
    try:
        model = load_model(corpus / entry.file)  # external data too
        normalize(model)  # as compress and inspect see it
        found = find_dense_layers(model)
    except Exception as error:
        record.scan_error = error_text(error)
        return
    record.layers_found = len(found.layers)
    record.skipped = [f"{s.node} ({s.op_type}): {s.reason}" for s in found.skipped]


def run_model(corpus: Path, entry: Entry, methods, ratios, work: Path) -> ModelRuns:
    record = ModelRuns(entry.name, entry.exporter, entry.y)
    scan(corpus, entry, record)
    feeds, labels = test_feeds(corpus, entry)
    original = y_output(corpus / entry.file, entry, feeds)
    if labels is not None:
        record.original_accuracy = float(np.mean(original.argmax(-1) == labels))
    for method in methods:
        for ratio in ratios:
            run = compress_once(corpus, entry, method, ratio, work)
            if run.ok:
                pruned = y_output(work / f"{entry.name}.{method}.{ratio}.onnx", entry, feeds)
                compare(original, pruned, entry, labels, run)
            print(f"{entry.name} {method} {ratio}: {'ok' if run.ok else run.error}", flush=True)
            record.runs.append(run)
    return record


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def model_table(record: ModelRuns) -> list[str]:
    lines = [
        f"### {record.name}",
        "",
        f"{record.exporter}; y = `{record.y}`; dense layers found: "
        f"{record.layers_found if record.scan_error is None else record.scan_error}; "
        f"skipped: {len(record.skipped)}"
        + (
            f"; original accuracy {record.original_accuracy:.3f}"
            if record.original_accuracy
            else ""
        ),
        "",
    ]
    lines += [f"- skipped {reason}" for reason in record.skipped[:10]]
    if len(record.skipped) > 10:
        lines.append(f"- ... {len(record.skipped) - 10} more skipped")
    lines += [
        "",
        "| method | ratio | result | pruned layers | sparsity | s | parity | top-1 agr. | "
        "MSE | rel. | accuracy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in record.runs:
        result = "ok" if run.ok else f"`{run.error.split(':', 1)[0]}`"
        lines.append(
            f"| {run.method} | {run.ratio} | {result} | {fmt(run.layers_pruned, 'd')} | "
            f"{fmt(run.sparsity, '.3f')} | {fmt(run.seconds, '.1f')} | "
            f"{fmt(run.parity_deviation, '.1e')} | {fmt(run.top1_agreement, '.3f')} | "
            f"{fmt(run.output_mse)} | {fmt(run.output_rel)} | {fmt(run.accuracy, '.3f')} |"
        )
    return [*lines, ""]


def failures(records: list[ModelRuns]) -> list[str]:
    """One line per model and distinct error, naming the runs that raised it."""
    lines = []
    for record in records:
        by_error: dict[str, list[str]] = {}
        for run in record.runs:
            if run.error:
                by_error.setdefault(run.error, []).append(f"{run.method}@{run.ratio}")
        lines += [
            f"- **{record.name}** ({', '.join(runs)}): `{error}`"
            for error, runs in by_error.items()
        ]
    return lines or ["- none"]


SUMMARY_METHODS = ("ecr", "ec", "magnitude", "sparsegpt")


def summary_table(records: list[ModelRuns]) -> list[str]:
    """Output MSE on the test set per model, method and ratio, side by side; `<mag` says
    whether ecr and ec beat magnitude at both ratios."""
    ratios = sorted({run.ratio for record in records for run in record.runs})
    columns = [(method, ratio) for ratio in ratios for method in SUMMARY_METHODS]
    lines = [
        "| model | layers | "
        + " | ".join(f"{method} @{ratio}" for method, ratio in columns)
        + " | ecr, ec < magnitude |",
        "|---|---:|" + "---:|" * len(columns) + "---|",
    ]
    for record in records:
        mse = {(run.method, run.ratio): run.output_mse for run in record.runs if run.ok}
        cells = [fmt(mse.get(column)) for column in columns]
        beats = all(
            mse.get((method, ratio)) is not None
            and mse.get(("magnitude", ratio)) is not None
            and mse[(method, ratio)] < mse[("magnitude", ratio)]
            for method in ("ecr", "ec")
            for ratio in ratios
        )
        pruned = max((run.layers_pruned or 0 for run in record.runs), default=0)
        lines.append(
            f"| {record.name} | {pruned}/{fmt(record.layers_found, 'd')} | "
            + " | ".join(cells)
            + f" | {'yes' if beats else 'no'} |"
        )
    return lines


def records_from_json(path: Path) -> tuple[list[ModelRuns], dict]:
    """The records and header a run wrote, to render them again (or several runs joined)."""
    data = json.loads(path.read_text())
    records = []
    for model in data["models"]:
        runs = [Run(**run) for run in model.pop("runs")]
        records.append(ModelRuns(**model, runs=runs))
    return records, {"package": data["package"], "commit": data["commit"]}


def markdown(records: list[ModelRuns], header: dict) -> str:
    ok = sum(run.ok for record in records for run in record.runs)
    total = sum(len(record.runs) for record in records)
    lines = [
        "# Corpus: compress on real exports",
        "",
        f"`benchmarks/corpus_run.py` with ecprune_onnx from {header['package']} "
        f"(commit {header['commit']}); {ok}/{total} compress calls succeeded. "
        "top-1 agr., MSE and rel. (||pruned - original|| / ||original||) are measured "
        "with onnxruntime on the test NPZ, on the output `y`; parity is compress' own.",
        "",
        "## Output MSE on the test set",
        "",
        *summary_table(records),
        "",
        "## Failures",
        "",
        *failures(records),
        "",
        "## Per model",
        "",
    ]
    for record in records:
        lines += model_table(record)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="write the markdown from these JSON results (joined in order), running nothing",
    )
    args = parser.parse_args(argv)
    if args.render:
        joined = [records_from_json(path) for path in args.render]
        records = [record for part, _ in joined for record in part]
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "corpus.md").write_text(markdown(records, joined[0][1]))
        return
    if not (args.corpus / "manifest.json").exists():
        raise SystemExit(f"no {args.corpus / 'manifest.json'}: run benchmarks/corpus.py first")
    only = set(args.only.split(",")) if args.only else set(QUICK_MODELS) if args.quick else None
    methods, ratios = (QUICK_METHODS, QUICK_RATIOS) if args.quick else (METHODS, RATIOS)
    entries = [e for e in load_manifest(args.corpus) if e.file and (not only or e.name in only)]
    header = {"package": str(Path(ecprune_onnx.__file__).parent), "commit": git_commit()}
    records = []
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "corpus_quick" if args.quick else "corpus"
    with tempfile.TemporaryDirectory(prefix="corpus_run_") as work:
        for entry in entries:
            records.append(run_model(args.corpus, entry, methods, ratios, Path(work)))
            data = {**header, "models": [asdict(record) for record in records]}
            (args.results / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(records, header))
    print(f"wrote {args.results / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
