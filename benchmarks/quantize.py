"""Quantization (and pruning + quantization) against onnxruntime's quantizers.

    python -m benchmarks.quantize --corpus DIR [--models NAME ...] [--out DIR]

Models: the trained transformers and MLP of the corpus (benchmarks/corpus.py writes them,
with their calibration and test NPZ and manifest.json, to DIR), and a 64-1024-1024-10 MLP
(1.1M weights) trained here on the digits task, written as MatMul + Add (onnxruntime's
MatMulNBits quantizers skip Gemm). Each model is compressed by

- ours (`compress(quantize=...)`): int8, int4 (blocks of 32), and with pruning in the same
  pass: 50 % + int8, 25 % / 2:4 + int4; and int8 written as QDQ;
- onnxruntime 1.31: `quantize_dynamic` (int8, per channel; DefaultTensorType float, which
  skl2onnx's graph needs), `quantize_static` (QDQ, int8
  per-channel weights, uint8 activations, calibrated on the same NPZ), `MatMulNBitsQuantizer`
  at 8 bits (default algorithm) and at 4 bits with RTN, GPTQ, HQQ and the default algorithm,
  block size 32 everywhere;

and run by onnxruntime (CPU) on the held-out test NPZ: output MSE against the float model
(the manifest's `y` output), the task metric (accuracy: top-1 of the class scores or of the
next character), file size raw and after gzip -9, latency at batch 1 and at the whole test
batch (one thread, every model's sessions interleaved, median of the rounds), and compress
time. Writes quantize.json and quantize.md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

from ecprune_onnx import compress
from ecprune_onnx.footprint import file_sizes

RESULTS = Path(__file__).resolve().parent / "results"
CORPUS_MODELS = (
    "sklearn_digits_mlp",
    "char_lm_dynamo",
    "char_lm_torchscript",
    "digits_vit_dynamo",
    "digits_vit_torchscript",
)
LARGE_MLP = "mlp_64-1024-1024-10"
BLOCK = 32
OURS = {  # name: compress() options
    "ours int8": {"quantize": "int8"},
    "ours int8 qdq": {"quantize": "int8", "quant_format": "qdq"},
    "ours int4": {"quantize": "int4"},
    "ours 50% + int8": {"quantize": "int8", "ratio": 0.5},
    "ours 25% + int4": {"quantize": "int4", "ratio": 0.25},
    "ours 2:4 + int4": {"quantize": "int4", "pattern": "2:4"},
}
BITS = {name: 8 if "int8" in name else 4 for name in OURS}
LATENCY_ROUNDS = 40
# onnxruntime's MatMulNBitsQuantizer: MatMul weights and Gather tables, each along its rows
NBITS_OPS = ("MatMul", "Gather")
NBITS_AXES = (("MatMul", 0), ("Gather", 1))


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the calibration NPZ, 32 rows a call."""

    def __init__(self, calib: Path, input_names: list[str]):
        arrays = np.load(calib)
        self.feeds = [
            {name: arrays[name][start : start + 32] for name in input_names}
            for start in range(0, len(arrays[input_names[0]]), 32)
        ]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self):
        self.position = 0

    def __iter__(self):  # the GPTQ of onnxruntime's bundled neural_compressor iterates it
        return iter(self.feeds)


def _ort_quantizers(calib: Path, inputs: list[str]) -> dict[str, tuple[int, Callable]]:
    """name: (bits, quantize(src, dst)) for each onnxruntime method."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    def nbits_run(config_factory, bits=4, **options):
        def run(src: Path, dst: Path) -> None:
            config = config_factory()
            quantizer = nbits.MatMulNBitsQuantizer(
                str(src), bits=bits, block_size=BLOCK, algo_config=config, **options
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)

        return run

    return {
        "ort quantize_dynamic": (
            8,
            lambda src, dst: quantize_dynamic(
                src,
                dst,
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            ),
        ),
        "ort quantize_static QDQ": (
            8,
            lambda src, dst: quantize_static(
                src,
                dst,
                _Reader(calib, inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            ),  # fmt: skip
        ),
        "ort nbits 8-bit default": (
            8,
            nbits_run(lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=BLOCK, bits=8), 8),
        ),
        "ort nbits RTN": (4, nbits_run(lambda: nbits.RTNWeightOnlyQuantConfig())),
        "ort nbits GPTQ": (
            4,
            nbits_run(
                lambda: nbits.GPTQWeightOnlyQuantConfig(
                    calibration_data_reader=_Reader(calib, inputs), block_size=BLOCK
                )
            ),
        ),
        "ort nbits HQQ": (4, nbits_run(lambda: nbits.HQQWeightOnlyQuantConfig(block_size=BLOCK))),
        "ort nbits default (MatMul only)": (
            4,
            nbits_run(lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=BLOCK, bits=4)),
        ),
        # its default 4-bit algorithm is the one that quantizes Gather tables too
        # (GatherBlockQuantized, int4 only; RTN, GPTQ and HQQ take MatMul alone)
        "ort nbits default +Gather": (
            4,
            nbits_run(
                lambda: nbits.DefaultWeightOnlyQuantConfig(
                    block_size=BLOCK, bits=4, op_types_to_quantize=NBITS_OPS, quant_axes=NBITS_AXES
                ),
                op_types_to_quantize=NBITS_OPS,
                quant_axes=NBITS_AXES,
            ),
        ),
    }


# Run by the interpreter of --nncf-python (NNCF in its own environment: its requirements
# must not move this project's torch/onnx/onnxruntime): argv = src, calib NPZ, dst, mode.
_NNCF_SCRIPT = """
import sys, numpy as np, onnx, nncf
src, calib, dst, mode = sys.argv[1:]
model = onnx.load(src)
arrays = np.load(calib)
names = [value.name for value in model.graph.input]
rows = len(arrays[names[0]])
feeds = [{n: arrays[n][i : i + 32] for n in names} for i in range(0, rows, 32)]
if mode == "int8":
    out = nncf.quantize(model, nncf.Dataset(feeds))
else:
    out = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32, ratio=1.0,
        advanced_parameters=nncf.AdvancedCompressionParameters(
            group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST
        ),
    )
onnx.save(out, dst)
"""


def _nncf_quantizers(python: Path, calib: Path) -> dict[str, tuple[int, Callable]]:
    """NNCF's post-training int8 quantization and its int4 weight compression, each run by
    the NNCF environment's interpreter in a child process."""

    def runner(mode: str) -> Callable:
        def run(src: Path, dst: Path) -> None:
            args = [str(python), "-c", _NNCF_SCRIPT, str(src), str(calib), str(dst), mode]
            subprocess.run(args, check=True, capture_output=True, text=True)

        return run

    return {
        "nncf quantize (int8 QDQ)": (8, runner("int8")),
        "nncf compress_weights INT4_ASYM": (4, runner("int4")),
    }


def build_large_mlp(folder: Path, calib_rows: int = 256) -> dict:
    """Train the 1.1M-weight digits MLP and write it as MatMul + Add + Tanh, with NPZs; the
    calibration NPZ holds `calib_rows` of the training rows (all 1437 at most)."""
    from benchmarks.tasks import load_task, train_mlp

    task = load_task("digits", 0.0, 0, calib_rows)
    model = train_mlp(task, [64, 1024, 1024, 10], 0, 30, 64, 1e-3)
    layers = list(model.layers)
    nodes, inits, x = [], [], "X"
    for i, layer in enumerate(layers):
        weight = layer.weight.detach().numpy().T.astype(np.float32)
        bias = layer.bias.detach().numpy().astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"W{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "logits" if i == len(layers) - 1 else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [x, f"W{i}"], [f"z{i}"], name=f"matmul{i}"),
            helper.make_node("Add", [f"z{i}", f"b{i}"], [f"a{i}" if out != "logits" else out]),
        ]
        if out != "logits":
            nodes.append(helper.make_node("Tanh", [f"a{i}"], [out]))
        x = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    path = folder / f"{LARGE_MLP}.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path
    )
    np.savez(folder / f"{LARGE_MLP}.calib.npz", X=task.x_calib.astype(np.float32))
    np.savez(
        folder / f"{LARGE_MLP}.test.npz",
        X=task.x_test.astype(np.float32),
        labels=task.y_test.astype(np.int64),
    )
    return {"name": LARGE_MLP, "file": path.name, "y": "logits", "labels": "labels"}


def _session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _metric(y: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy of the class scores (last axis) against integer labels."""
    if labels is None:
        return None
    return float((y.argmax(-1) == labels).mean())


def _latencies(paths: dict[str, Path], feeds: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Median ms per run at batch 1 and at the whole test batch, every session interleaved."""
    sessions = {name: _session(path) for name, path in paths.items()}
    medians = {name: [] for name in sessions}
    for rows in (1, len(next(iter(feeds.values())))):
        batch = {key: value[:rows] for key, value in feeds.items()}
        times = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, batch)  # warm-up
        for _ in range(LATENCY_ROUNDS):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, batch)
                times[name].append((time.perf_counter() - start) * 1000)
        for name in sessions:
            medians[name].append(float(np.median(times[name])))
    return medians


def bench_model(
    entry: dict, corpus: Path, folder: Path, nncf_python: Path | None, only: list[str] | None
) -> list[dict]:
    """Every method on one model; one record per method (with `error` where it failed)."""
    name = entry["name"]
    src = corpus / entry["file"]
    calib, test = corpus / f"{name}.calib.npz", corpus / f"{name}.test.npz"
    inputs = [value.name for value in onnx.load(src, load_external_data=False).graph.input]
    arrays = np.load(test)
    feeds = {key: arrays[key] for key in inputs}
    labels = arrays[entry["labels"]] if entry.get("labels") in arrays else None
    y = entry["y"]
    reference = _session(src).run([y], feeds)[0].astype(np.float64)
    records, paths = [], {"float32": src}
    methods = {key: (BITS[key], _ours(calib, options)) for key, options in OURS.items()}
    rivals = _ort_quantizers(calib, inputs)
    if nncf_python is not None:
        rivals.update(_nncf_quantizers(nncf_python, calib))
    # the rivals get the model as one file: onnxruntime's quantizers write a model read with
    # external data back with a data path that does not resolve from where it is written
    single = folder / f"{name}.single.onnx"
    onnx.save(onnx.load(src), single)
    methods.update({key: (bits, _from(single, run)) for key, (bits, run) in rivals.items()})
    if only:
        methods = {k: v for k, v in methods.items() if any(k.startswith(m) for m in only)}
    for method, (bits, run) in methods.items():
        dst = folder / f"{name}.{method.replace(' ', '_').replace('%', '').replace(':', 'of')}.onnx"
        record = {"model": name, "method": method, "bits": bits}
        try:
            start = time.perf_counter()
            run(src, dst)
            record["seconds"] = time.perf_counter() - start
            out = _session(dst).run([y], feeds)[0].astype(np.float64)
        except Exception as error:  # a rival that fails on a model is a result, not a crash
            first_line = (str(error).splitlines() or [""])[0][:160]
            record["error"] = f"{type(error).__name__}: {first_line}"
            traceback.print_exc()
            records.append(record)
            continue
        sizes = file_sizes(dst)
        record.update(
            mse=float(np.square(out - reference).mean()),
            metric=_metric(out, labels),
            changed=int((out.argmax(-1) != reference.argmax(-1)).sum()),
            breakdown=byte_breakdown(dst),
            raw_bytes=sizes.raw,
            gzip_bytes=sizes.gzip,
        )
        records.append(record)
        paths[method] = dst
        print(f"{name:24s} {method:26s} mse {record['mse']:.3e} {sizes.raw:>9,} B", flush=True)
    sizes = file_sizes(src)
    base = {"model": name, "method": "float32", "bits": 32, "mse": 0.0, "seconds": 0.0}
    base.update(metric=_metric(reference, labels), raw_bytes=sizes.raw, gzip_bytes=sizes.gzip)
    base.update(
        changed=0, predictions=int(reference.argmax(-1).size), breakdown=byte_breakdown(src)
    )
    records.insert(0, base)
    latency = _latencies(paths, feeds)
    for record in records:
        if record["method"] in latency:
            record["latency_ms"] = latency[record["method"]]
    return records


# the inputs that hold scales: MatMulNBits' and GatherBlockQuantized's third,
# DequantizeLinear's second
SCALE_INPUTS = {"MatMulNBits": 2, "GatherBlockQuantized": 2, "DequantizeLinear": 1}


def byte_breakdown(path: Path) -> dict:
    """Where a file's bytes go: integer codes (and zero points), float scales, the other
    float tensors (biases, norms, position embeddings, tables left float; the three largest
    named), and the graph (nodes and Constants, value infos; the exporter's per-node
    metadata counted apart)."""
    model = onnx.load(path)
    scales = {
        node.input[SCALE_INPUTS[node.op_type]]
        for node in model.graph.node
        if node.op_type in SCALE_INPUTS and len(node.input) > SCALE_INPUTS[node.op_type]
    }
    codes = scale_bytes = 0
    others = []
    for tensor in model.graph.initializer:
        size = tensor.ByteSize()
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            codes += size
        elif tensor.name in scales:
            scale_bytes += size
        else:
            others.append((size, tensor.name))
    others.sort(reverse=True)
    metadata = sum(entry.ByteSize() for n in model.graph.node for entry in n.metadata_props)
    return {
        "codes": codes,
        "scales": scale_bytes,
        "float": sum(size for size, _ in others),
        "largest_float": others[:3],
        "graph": model.ByteSize() - codes - scale_bytes - sum(size for size, _ in others),
        "node_metadata": metadata,
    }


def breakdown_table(records: list[dict]) -> str:
    """The byte breakdown of the float32 file and of ours at int8 and int4, per model."""
    lines = [
        "| model | file | bytes | codes | scales | other float tensors (largest) | graph "
        "(exporter's node metadata) |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        if record["method"] not in ("float32", "ours int8", "ours int4"):
            continue
        if "breakdown" not in record:
            continue
        b = record["breakdown"]
        largest = ", ".join(f"{name} {size:,}" for size, name in b["largest_float"])
        lines.append(
            f"| {record['model']} | {record['method']} | {record['raw_bytes']:,} | "
            f"{b['codes']:,} | {b['scales']:,} | {b['float']:,} ({largest}) | "
            f"{b['graph']:,} ({b['node_metadata']:,}) |"
        )
    return "\n".join(lines)


def _from(source: Path, run: Callable) -> Callable:
    """`run` reading `source` instead of the path it is given."""
    return lambda src, dst: run(source, dst)


def _ours(calib: Path, options: dict) -> Callable:
    def run(src: Path, dst: Path) -> None:
        compress(src, calib, output=dst, force=True, **options)

    return run


def tables(records: list[dict], dense_share: dict[str, float]) -> str:
    """One markdown table per model, then the pairs where pruning beats quantization alone."""
    lines = []
    for model in dict.fromkeys(record["model"] for record in records):
        rows = [record for record in records if record["model"] == model]
        lines += [
            f"### {model} (dense weights: {dense_share[model]:.0%} of the float32 file's bytes)",
            "",
            "| method | bits | output MSE | metric (top-1 ≠ float32) | file, B | ×smaller | "
            "gzip -9, B | "
            "latency b=1 / b=test, ms | compress, s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = rows[0]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['bits']} | failed: {row['error']} |||||||")
                continue
            latency = " / ".join(f"{value:.3g}" for value in row.get("latency_ms", []))
            metric = "—" if row["metric"] is None else f"{row['metric']:.2%}"
            if "changed" in row:
                metric += f" ({row['changed']})"
            lines.append(
                f"| {row['method']} | {row['bits']} | {row['mse']:.3g} | {metric} | "
                f"{row['raw_bytes']:,} | {base['raw_bytes'] / row['raw_bytes']:.2f} | "
                f"{row['gzip_bytes']:,} | {latency} | {row['seconds']:.1f} |"
            )
        lines += ["", *_pruning_pairs(rows), ""]
    return "\n".join(lines)


def _pruning_pairs(rows: list[dict]) -> list[str]:
    """Pruned + quantized files with a smaller gzip size than a quantized-only file of ours
    (in the same, default, format) and an output MSE no higher."""
    done = [row for row in rows if "error" not in row]
    ours = [row for row in done if row["method"].startswith("ours")]
    alone = [row for row in ours if row["method"] in ("ours int8", "ours int4")]
    pruned = [row for row in ours if "+" in row["method"]]
    found = [
        f"- {p['method']} ({p['gzip_bytes']:,} B gzip, MSE {p['mse']:.3g}) beats "
        f"{a['method']} ({a['gzip_bytes']:,} B, MSE {a['mse']:.3g})"
        for p in pruned
        for a in alone
        if p["gzip_bytes"] < a["gzip_bytes"] and p["mse"] <= a["mse"]
    ]
    return found or ["- no pruned + quantized file is both smaller (gzip) and as accurate"]


def verdict(records: list[dict]) -> str:
    """The issue's checks per model: ours (default int8 / int4) against every onnxruntime
    method of the same bit width (lower output MSE, metric at least as good), and the size
    ratios against float32 (int8 >= 3.8x, int4 >= 6x)."""
    lines = [
        "| model | bits | ours: MSE, metric, ×smaller | beaten (lower MSE, metric ≥) "
        "| not beaten |",
        "|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(record["model"] for record in records):
        rows = {r["method"]: r for r in records if r["model"] == model and "error" not in r}
        base = rows["float32"]
        for bits, ours_name in ((8, "ours int8"), (4, "ours int4")):
            ours = rows.get(ours_name)
            if ours is None:
                continue
            rivals = [
                r
                for name, r in rows.items()
                if name.startswith(("ort", "nncf")) and r["bits"] == bits
            ]
            beaten = [r["method"] for r in rivals if _beats(ours, r)]
            others = [r["method"] for r in rivals if not _beats(ours, r)]
            metric = "—" if ours["metric"] is None else f"{ours['metric']:.2%}"
            lines.append(
                f"| {model} | {bits} | {ours['mse']:.3g}, {metric}, "
                f"{base['raw_bytes'] / ours['raw_bytes']:.2f}× | {', '.join(beaten) or '—'} | "
                f"{', '.join(others) or '—'} |"
            )
    return "\n".join(lines)


def _beats(ours: dict, rival: dict) -> bool:
    metric_ok = ours["metric"] is None or ours["metric"] >= rival["metric"]
    return ours["mse"] < rival["mse"] and metric_ok


def dense_share(path: Path) -> float:
    """Bytes of dense-layer weights over the bytes of the float model's files: what
    quantizing them can shrink (the rest is other tensors and the graph itself)."""
    from ecprune_onnx.layers import find_dense_layers
    from ecprune_onnx.modelio import load_model
    from ecprune_onnx.normalize import normalize

    model = load_model(path)
    normalize(model)
    dense = sum(layer.compact_weight.nbytes for layer in find_dense_layers(model).layers)
    return dense / file_sizes(path).raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="benchmarks/corpus.py's DIR")
    parser.add_argument("--models", nargs="*", help="a subset (names of the manifest, or mlp)")
    parser.add_argument("--methods", nargs="*", help="a subset, by prefix (e.g. ours nncf)")
    parser.add_argument(
        "--nncf-python", type=Path, help="interpreter of an environment with NNCF installed"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", nargs="*", type=Path, help="only write quantize.md from these JSON results"
    )
    args = parser.parse_args()
    if args.render:
        return render(args.render, args.out)
    return run(args)


def render(paths: list[Path], out: Path) -> None:
    """quantize.md from the JSON of several runs (e.g. the main one and an NNCF one): each
    model's records in run order, its float32 row once."""
    shares, records, headers = {}, [], []
    for path in paths:
        data = json.loads(path.read_text())
        shares.update(data["shares"])
        headers.append(f"- {path.name}: {data.get('header', '').strip()}")
        records += data["records"]
    ordered = [r for model in shares for r in records if r["model"] == model]
    unique = []
    for record in ordered:  # a float32 row per model, the first
        if record["method"] != "float32" or not any(
            u["model"] == record["model"] and u["method"] == "float32" for u in unique
        ):
            unique.append(record)
    text = "\n".join(headers) + "\n\n" + verdict(unique) + "\n\n" + breakdown_table(unique)
    text += "\n\n" + tables(unique, shares)
    (out / "quantize.md").write_text(text + "\n")
    print(text)


def run(args: argparse.Namespace) -> None:
    manifest = {e["name"]: e for e in json.loads((args.corpus / "manifest.json").read_text())}
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records, shares = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        names = [*CORPUS_MODELS, LARGE_MLP]
        if args.models:
            names = [name for name in names if any(name.startswith(m) for m in args.models)]
        for name in names:
            entry = build_large_mlp(folder) if name == LARGE_MLP else manifest[name]
            corpus = folder if entry["name"] == LARGE_MLP else args.corpus
            shares[entry["name"]] = dense_share(corpus / entry["file"])
            records += bench_model(entry, corpus, folder, args.nncf_python, args.methods)
            partial = {"shares": shares, "records": records}  # a crash keeps what was done
            (args.out / "quantize.partial.json").write_text(json.dumps(partial, indent=1))
    seconds = time.perf_counter() - started
    header = (
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; onnxruntime "
        f"{onnxruntime.__version__}, one thread; shared with other jobs. One run, "
        f"{seconds / 60:.0f} min. `python -m benchmarks.quantize --corpus DIR`.\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quantize" if not args.methods else "quantize-" + "-".join(args.methods)
    results = {"header": header, "shares": shares, "records": records}
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    text = header + verdict(records) + "\n\n" + breakdown_table(records) + "\n\n"
    text += tables(records, shares) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
