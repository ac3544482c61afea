"""Transformers shrunk by FFN neurons and attention heads: size, latency and quality.

    python -m benchmarks.transformer_structured [--quick] [--corpus DIR] [--out DIR]

(a) A BERT-base-sized export (transformers BertModel: 12 layers, hidden 768, 12 heads,
    FFN 3072, vocabulary 30522; random weights, eager attention) exported by torch's
    TorchScript exporter with dynamic batch and sequence length. Half of every FFN's units
    and half of every layer's heads are removed (`--structure neuron --method magnitude
    --scope layer`: the size and speed do not depend on which units go). The shrunk file
    must pass onnx's full check; file sizes, and onnxruntime CPU latency (1 thread, median,
    original and shrunk interleaved) at batch 1 and 4 and sequence lengths 32, 128, 256.
(b) The trained transformers of benchmarks/corpus.py (char LM, digits ViT; TorchScript and
    dynamo exports), at 25 % and 50 % of the units (neurons and heads, each kind budgeted
    apart) by the recommended mode and three anchors (ROWS): test output MSE against the
    unpruned model, the task metric (next-character accuracy, digit accuracy), file size.

Writes `transformer_structured[_PART].json` and `.md` to --out (benchmarks/results by
default); `--part bert` or `--part trained` runs one half.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import corpus
from benchmarks.structured import unit_weight_stats
from ecprune_onnx import compress
from ecprune_onnx.calib import input_specs, load_calib
from ecprune_onnx.evaluate import measure_latency
from ecprune_onnx.heads import find_unit_groups
from ecprune_onnx.modelio import load_model
from ecprune_onnx.neurons import prune_neurons
from ecprune_onnx.normalize import normalize

RESULTS = Path(__file__).resolve().parent / "results"
BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512,
)  # fmt: skip
BERT_QUICK = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=160)  # fmt: skip
SHAPES = ((1, 32), (1, 128), (1, 256), (4, 32), (4, 128), (4, 256))  # (batch, seq)
TRAINED = ("char_lm_torchscript", "char_lm_dynamo", "digits_vit_torchscript", "digits_vit_dynamo")
RATIOS = (0.25, 0.5)
LATENCY_SECONDS = 3.0


@dataclass(frozen=True)
class Row:
    """A method row: compress(structure="neuron") options, or FLAP's recipe."""

    label: str
    method: str
    scope: str
    compensate: bool | None = None
    flap: bool = False


ROWS = (
    # recommended: greedy structured OBS scores, refit, budgets by measured output damage
    Row("ec (refit, measured budget)", "ec", "global"),
    # ZipLM-like: greedy structured OBS + refit, the same share of every layer
    Row("ZipLM-like (OBS + refit, uniform)", "ec", "layer"),
    # FLAP-like: fluctuation metric (‖W[:, j]‖² Var a_j) + mean bias compensation, uniform
    Row("FLAP-like (fluctuation + bias)", "ec", "layer", flap=True),
    Row("magnitude (group L2, uniform)", "magnitude", "layer"),
)


# --------------------------------------------------------------------------- exports


def export_bert(path: Path, exporter: str, seed: int = 0, **config) -> Path:
    """transformers' BertModel (eager attention, random weights) exported with dynamic batch
    and sequence length; its output is the last hidden state."""
    import torch
    import transformers

    settings = {**BERT_QUICK, "attn_implementation": "eager", **config}
    torch.manual_seed(seed)
    bert = transformers.BertModel(transformers.BertConfig(**settings)).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids = torch.randint(1, settings["vocab_size"], (2, 8))
    example = (ids, torch.ones_like(ids))
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["hidden"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=150)
            shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
            torch.onnx.export(
                Hidden(), example, str(path), dynamo=True, opset_version=18,
                dynamic_shapes=shapes, external_data=False, **names,
            )  # fmt: skip
        else:
            axes = {name: {0: "batch", 1: "seq"} for name in [*names["input_names"], "hidden"]}
            torch.onnx.export(
                Hidden(), example, str(path), dynamo=False, opset_version=17,
                dynamic_axes=axes, **names,
            )  # fmt: skip
    return path


def bert_feeds(batch: int, seq: int, seed: int = 0, vocab: int = 60) -> dict[str, np.ndarray]:
    """Token ids and an attention mask with one half-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- (a) BERT-base


def one_thread_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bert_base(folder: Path, config: dict, shapes, latency_seconds: float, log) -> dict:
    """Half the FFN units and half the heads out of a BERT-base-sized export."""
    original, shrunk = folder / "bert_base.onnx", folder / "bert_base_half.onnx"
    started = time.perf_counter()
    export_bert(original, "torchscript", **config)
    export_seconds = time.perf_counter() - started
    started = time.perf_counter()
    compress(original, None, 0.5, output=shrunk, method="magnitude", scope="layer",
             structure="neuron", force=True)  # fmt: skip
    record = {
        "config": config,
        "export_seconds": export_seconds,
        "prune_seconds": time.perf_counter() - started,
        "size_original": disk_size(original),
        "size_pruned": disk_size(shrunk),
        "full_check": _full_check(shrunk),
        "latency": [],
    }
    sessions = one_thread_session(original), one_thread_session(shrunk)
    for batch, seq in shapes:
        feeds = bert_feeds(batch, seq, vocab=config["vocab_size"])
        timing = measure_latency(*sessions, feeds, ["hidden"], latency_seconds)
        outputs = [session.run(None, feeds)[0] for session in sessions]
        record["latency"].append({
            "batch": batch, "seq": seq,
            "original_ms": timing.original.median_ms, "pruned_ms": timing.pruned.median_ms,
            "output_shape_same": outputs[0].shape == outputs[1].shape,
        })  # fmt: skip
        print(json.dumps(record["latency"][-1]), flush=True, file=log)
    return record


def _full_check(path: Path) -> str:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        return f"failed: {error}"
    return "passed"


# --------------------------------------------------------------------------- (b) trained


def prune(row: Row, path: Path, calib: Path, ratio: float, output: Path) -> None:
    if row.flap:
        flap_prune(path, calib, ratio, output)
        return
    compress(path, calib, ratio, output=output, method=row.method, scope=row.scope,
             compensate=row.compensate, structure="neuron", seed=0, force=True)  # fmt: skip


def flap_prune(path: Path, calib: Path, ratio: float, output: Path) -> None:
    """FLAP's recipe through neurons.prune_neurons: with every output sensitivity 1, EC's
    structured score is the fluctuation metric and its bias shift the mean compensation
    (benchmarks/structured.unit_weight_stats); the same share of every layer."""
    model = load_model(path)
    normalize(model)
    data = load_calib(calib, input_specs(model))
    groups = find_unit_groups(model).groups
    stats = {c.name: unit_weight_stats(model, c, data) for g in groups for c in g.consumers}
    pruned = prune_neurons(model, groups, stats, "ec", ratio, "layer", "bias", 0, None)
    onnx.save(pruned.model, output)


def task_metric(entry: corpus.Entry, logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy: of the next character at every position (char LM) or of the digit."""
    return float((logits.argmax(-1) == labels).mean())


def trained(folder: Path, corpus_dir: Path, names, ratios, log) -> list[dict]:
    entries = {entry.name: entry for entry in corpus.load_manifest(corpus_dir)}
    records = []
    for name in names:
        entry = entries[name]
        path, calib = corpus_dir / entry.file, corpus_dir / entry.calib
        test = dict(np.load(corpus_dir / entry.test))
        feeds = {spec["name"]: test[spec["name"]] for spec in entry.inputs}
        original = one_thread_session(path).run([entry.y], feeds)[0].astype(np.float64)
        for ratio in ratios:
            for row in ROWS:
                output = folder / f"{name}-{ratio}-{ROWS.index(row)}.onnx"
                started = time.perf_counter()
                prune(row, path, calib, ratio, output)
                pruned = one_thread_session(output).run([entry.y], feeds)[0].astype(np.float64)
                records.append({
                    "model": name, "ratio": ratio, "method": row.label,
                    "seconds": time.perf_counter() - started,
                    "output_mse": float(np.mean((pruned - original) ** 2)),
                    "metric": task_metric(entry, pruned, test[entry.labels]),
                    "metric_original": task_metric(entry, original, test[entry.labels]),
                    "size_original": disk_size(path),
                    "size_pruned": disk_size(output),
                })  # fmt: skip
                print(json.dumps(records[-1]), flush=True, file=log)
    return records


def disk_size(path: Path) -> int:
    """Bytes on disk: the .onnx file and the external-data files it names (torch's dynamo
    exporter and compress write large weights beside the graph)."""
    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return os.path.getsize(path) + sum(os.path.getsize(path.parent / name) for name in files)


def corpus_models(corpus_dir: Path | None, names) -> Path:
    """The corpus folder holding `names`, built by benchmarks/corpus.py where missing."""
    corpus_dir = corpus_dir or corpus.DEFAULT_OUT
    missing = [n for n in names if not (corpus_dir / f"{n}.onnx").exists()]
    if missing or not (corpus_dir / "manifest.json").exists():
        corpus.build(corpus_dir, list(names), quick=False, tf_python=None)
    return corpus_dir


# --------------------------------------------------------------------------- report


def bert_table(base: dict) -> list[str]:
    lines = ["### (a) BERT-base-sized export, half the FFN units and half the heads removed", ""]
    size = base["size_original"] / base["size_pruned"]
    lines += [
        f"File {base['size_original']:,} B → {base['size_pruned']:,} B ({size:.2f}× smaller); "
        f"onnx full check of the shrunk file: {base['full_check']}.",
        "",
        "| batch | seq | original ms | shrunk ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for item in base["latency"]:
        speed = item["original_ms"] / item["pruned_ms"]
        lines.append(
            f"| {item['batch']} | {item['seq']} | {item['original_ms']:.1f} | "
            f"{item['pruned_ms']:.1f} | {speed:.2f}× |"
        )
    return lines


def trained_table(records: list[dict]) -> list[str]:
    lines = []
    lines += ["### (b) trained transformers: share of units removed (neurons and heads)", ""]
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        ratios = list(dict.fromkeys(r["ratio"] for r in rows))
        lines += [f"#### {model} (unpruned test accuracy {rows[0]['metric_original']:.4f})", ""]
        head = " | ".join(f"MSE {x:g} | accuracy {x:g} | size × {x:g}" for x in ratios)
        lines += [f"| method | {head} |", "|---" * (1 + 3 * len(ratios)) + "|"]
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for ratio in ratios:
                r = next(r for r in rows if r["method"] == method and r["ratio"] == ratio)
                shrink = r["size_original"] / r["size_pruned"]
                cells += [f"{r['output_mse']:.4g}", f"{r['metric']:.4f}", f"{shrink:.2f}"]
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT, one model, ratio 0.5")
    parser.add_argument("--corpus", type=Path, help="corpus folder (default: build it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--part", choices=("all", "bert", "trained"), default="all")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = BERT_QUICK if args.quick else BERT_BASE
    shapes = ((1, 8), (3, 16)) if args.quick else SHAPES
    names = TRAINED[:1] if args.quick else TRAINED
    ratios = (0.5,) if args.quick else RATIOS
    summary, lines = {}, []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        if args.part in ("all", "bert"):
            seconds = 0.2 if args.quick else LATENCY_SECONDS
            summary["bert_base"] = bert_base(folder, config, shapes, seconds, None)
            lines += bert_table(summary["bert_base"])
        if args.part in ("all", "trained"):
            corpus_dir = corpus_models(args.corpus, names)
            summary["trained"] = trained(folder, corpus_dir, names, ratios, None)
            lines += trained_table(summary["trained"])
    stem = "transformer_structured" + ("" if args.part == "all" else f"_{args.part}")
    stem += "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - started
    summary.update(seconds=seconds, cpus=os.cpu_count(), onnxruntime=ort.__version__)
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = "\n".join(lines)
    footer = f"\n\n{seconds:.0f} s on {os.cpu_count()} CPUs; onnxruntime {ort.__version__}.\n"
    (args.out / f"{stem}.md").write_text(text + footer)
    print(text + footer)


if __name__ == "__main__":
    main()
