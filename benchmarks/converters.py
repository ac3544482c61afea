"""Which ONNX -> torch converter handles the corpus (benchmarks/corpus.py)? Measured, not read.

    python benchmarks/converters.py [--corpus DIR] [--rows N] [--only NAME,...]

For every model of the corpus manifest and each converter (onnx2pytorch, the one the tool
uses, called as the tool calls it; onnx2torch), records: whether it converts (else the
exception), whether the converted module runs on the first N calibration rows (float
inputs as given, integer ids as given), the deviation from onnxruntime on those rows,
conversion time, and how many of the graph's Gemm/MatMul nodes became nn.Linear (the
modules the tool instruments). Writes benchmarks/results/converters.{json,md}.

Deviation: for each float output max|torch - onnxruntime| / max|onnxruntime|, the largest
over the outputs; integer outputs (a classifier's label) must be equal and count as 1.0
when not.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.corpus import DEFAULT_OUT, first_lines, load_manifest, onnxruntime_outputs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONVERTERS = ("onnx2pytorch", "onnx2torch")
MATCH_TOLERANCE = 1e-4  # float32 kernels in a different order: 1e-6 .. 1e-5 is normal


@dataclass
class Conversion:
    model: str
    converter: str
    converts: bool
    runs: bool
    max_rel_dev: float | None
    convert_seconds: float | None
    run_seconds: float | None
    linear_modules: int | None
    dense_nodes: int
    error: str | None  # "convert: Type: message" or "run: Type: message"

    @property
    def matches(self) -> bool:
        return self.max_rel_dev is not None and self.max_rel_dev <= MATCH_TOLERANCE


def convert(converter: str, model: onnx.ModelProto) -> torch.nn.Module:
    if converter == "onnx2pytorch":
        from onnx2pytorch import ConvertModel

        # as ecprune_onnx/instrument.py calls it (0.6 folds MatMul + Add in place: a copy)
        return ConvertModel(copy.deepcopy(model))
    from onnx2torch import convert as onnx2torch_convert

    return onnx2torch_convert(copy.deepcopy(model))


def run_module(module: torch.nn.Module, model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    initialized = {tensor.name for tensor in model.graph.initializer}
    names = [value.name for value in model.graph.input if value.name not in initialized]
    with torch.no_grad():
        results = module(*[torch.from_numpy(feeds[name]) for name in names])
    if not isinstance(results, (list, tuple)):
        results = [results]
    return [result.detach().numpy() for result in results]


def deviation(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs, onnxruntime gives {len(reference)}")
    worst = 0.0
    for ref, got in zip(reference, candidate):
        if ref.shape != got.shape:
            raise ValueError(f"output shape {list(got.shape)}, onnxruntime {list(ref.shape)}")
        if ref.dtype.kind in "iub":
            worst = max(worst, 0.0 if np.array_equal(ref, got) else 1.0)
            continue
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref))) / scale)
    return worst


def dense_nodes(model: onnx.ModelProto) -> int:
    """Gemm and MatMul nodes with a stored weight (an initializer or Constant operand), in
    the main graph and in subgraphs (If branches); attention's activation x activation
    MatMuls are not dense layers."""
    stored = {tensor.name for tensor in model.graph.initializer}
    stored |= {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }

    def count(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            weighted = any(name in stored for name in node.input[:2])
            total += node.op_type in ("Gemm", "MatMul") and weighted
            for attribute in node.attribute:
                if attribute.g.node:
                    total += count(attribute.g)
                total += sum(count(sub) for sub in attribute.graphs)
        return total

    return count(model.graph)


def measure(name: str, converter: str, model: onnx.ModelProto, feeds, reference) -> Conversion:
    result = Conversion(
        name, converter, False, False, None, None, None, None, dense_nodes(model), None
    )
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(converter, model).eval()
    except Exception as error:  # a failure is the measurement
        result.error = f"convert: {type(error).__name__}: {first_lines(str(error), 300)}"
        result.error += where(error)
        return result
    result.converts = True
    result.convert_seconds = round(time.perf_counter() - started, 3)
    result.linear_modules = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = run_module(module, model, feeds)
        result.run_seconds = round(time.perf_counter() - started, 3)
        result.max_rel_dev = deviation(reference, outputs)
        result.runs = True
    except Exception as error:
        result.error = f"run: {type(error).__name__}: {first_lines(str(error), 300)}"
        result.error += where(error)
    return result


def where(error: BaseException) -> str:
    """The innermost converter frame, so a failure names the file and line that raised it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "site-packages" in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" [{frame.filename.split('site-packages/')[-1]}:{frame.lineno}]"


def survey(corpus: Path, rows: int, only: list[str] | None) -> list[Conversion]:
    results = []
    for entry in load_manifest(corpus):
        if entry.file is None or (only and entry.name not in only):
            continue
        model = onnx.load(str(corpus / entry.file))
        with np.load(corpus / entry.calib) as calib:
            feeds = {key: calib[key][:rows] for key in calib}
        reference = onnxruntime_outputs(corpus / entry.file, feeds)
        for converter in CONVERTERS:
            result = measure(entry.name, converter, model, feeds, reference)
            print(f"{entry.name} {converter}: {result.max_rel_dev} {result.error or ''}")
            results.append(result)
    return results


def format_dev(result: Conversion) -> str:
    if result.max_rel_dev is None:
        return "-"
    mark = "" if result.matches else " ✗"
    return f"{result.max_rel_dev:.1e}{mark}"


def markdown(results: list[Conversion], rows: int) -> str:
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in CONVERTERS)
    lines = [
        "# ONNX -> torch converters on the corpus",
        "",
        f"Measured by `benchmarks/converters.py` ({versions}, torch {torch.__version__}, "
        f"onnxruntime {metadata.version('onnxruntime-gpu')}) on the first {rows} calibration rows "
        "of each model built by `benchmarks/corpus.py`. dev = max over outputs of "
        "max|torch - onnxruntime| / max|onnxruntime| (✗ above "
        f"{MATCH_TOLERANCE:g}); Linear = nn.Linear modules in the converted module; "
        "dense nodes = Gemm / "
        "MatMul nodes with a stored weight (attention's activation products left out).",
        "",
        "| model | dense nodes | "
        + " | ".join(f"{c} dev | {c} Linear | {c} s" for c in CONVERTERS)
        + " |",
        "|---|---:|" + "---|---:|---:|" * len(CONVERTERS),
    ]
    by_model: dict[str, dict[str, Conversion]] = {}
    for result in results:
        by_model.setdefault(result.model, {})[result.converter] = result
    for model, found in by_model.items():
        cells = [model, str(next(iter(found.values())).dense_nodes)]
        for converter in CONVERTERS:
            result = found[converter]
            dev = format_dev(result) if result.converts else "fails to convert"
            if result.converts and not result.runs:
                dev = "fails to run"
            linear = str(result.linear_modules or 0) if result.converts else "-"
            seconds = f"{result.convert_seconds:.2f}" if result.convert_seconds else "-"
            cells += [dev, linear, seconds]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Summary", ""]
    for converter in CONVERTERS:
        mine = [r for r in results if r.converter == converter]
        lines.append(
            f"- {converter}: converts {sum(r.converts for r in mine)}/{len(mine)}, runs "
            f"{sum(r.runs for r in mine)}/{len(mine)}, matches onnxruntime "
            f"{sum(r.matches for r in mine)}/{len(mine)}"
        )
    lines += ["", "## Errors", ""]
    for result in results:
        if result.error:
            lines.append(f"- **{result.model}** / {result.converter}: `{result.error}`")
        elif not result.matches:
            lines.append(
                f"- **{result.model}** / {result.converter}: runs but deviates "
                f"({result.max_rel_dev:.3g})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    results = survey(args.corpus, args.rows, only)
    args.results.mkdir(parents=True, exist_ok=True)
    records = [{**asdict(r), "matches": r.matches} for r in results]
    (args.results / "converters.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.results / "converters.md").write_text(markdown(results, args.rows))
    print(f"wrote {args.results / 'converters.md'}")


if __name__ == "__main__":
    main()
