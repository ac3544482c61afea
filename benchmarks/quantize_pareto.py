"""Does pruning + quantization reach a smaller gzip file than quantization alone at equal or
lower output MSE? The (gzip size, output MSE) Pareto frontiers of both, on our own files.

    python -m benchmarks.quantize_pareto --corpus DIR [--models NAME ...] [--out DIR]
        [--mlp-calib-rows N]

Quantization alone: int8 and int4 at blocks of 16, 32, 64 and 128, each symmetric and
asymmetric. Pruning + quantization (one `ecr` pass): 5, 10, 20, 35 and 50 % of the weights
and 2:4, with int8 and with int4 at blocks of 16 and 32, symmetric and asymmetric (a
symmetric grid's zero point is the same code in every block, so a removed weight is the
same byte pattern everywhere, which gzip codes shorter). Output MSE on the held-out test
NPZ against the float32 model, run by onnxruntime (CPU, one thread). Writes
quantize_pareto.json and .md to --out (default benchmarks/results).

A pruned point *dominates* a quantization-alone point when its gzip file is smaller and its
MSE no higher; the question is whether any pruned point dominates a point of the
quantization-alone frontier (a point no other quantization-alone file dominates).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.quantize import LARGE_MLP, RESULTS, _session, build_large_mlp
from ecprune_onnx import compress
from ecprune_onnx.footprint import file_sizes

MODELS = (LARGE_MLP, "digits_vit_torchscript", "char_lm_torchscript")
BLOCKS = (16, 32, 64, 128)
SPARSITIES = (0.05, 0.1, 0.2, 0.35, 0.5)


def settings() -> dict[str, dict]:
    """label: compress() options, quantization alone and pruned + quantized."""
    found = {}
    for symmetric in (False, True):
        grid = "sym" if symmetric else "asym"
        found[f"int8 {grid}"] = {"quantize": "int8", "symmetric": symmetric}
        for block in BLOCKS:
            found[f"int4/{block} {grid}"] = {
                "quantize": "int4", "block_size": block, "symmetric": symmetric
            }  # fmt: skip
        grids = [("int8", {"quantize": "int8"})] + [
            (f"int4/{block}", {"quantize": "int4", "block_size": block}) for block in (16, 32)
        ]
        for name, options in grids:
            for ratio in SPARSITIES:
                found[f"{ratio:.0%} + {name} {grid}"] = {
                    **options, "ratio": ratio, "symmetric": symmetric
                }  # fmt: skip
            found[f"2:4 + {name} {grid}"] = {**options, "pattern": "2:4", "symmetric": symmetric}
    return found


def measure(entry: dict, corpus: Path, folder: Path) -> list[dict]:
    name = entry["name"]
    src, calib = corpus / entry["file"], corpus / f"{name}.calib.npz"
    arrays = np.load(corpus / f"{name}.test.npz")
    inputs = [value.name for value in onnx.load(src, load_external_data=False).graph.input]
    feeds = {key: arrays[key] for key in inputs}
    reference = _session(src).run([entry["y"]], feeds)[0].astype(np.float64)
    records = []
    for label, options in settings().items():
        dst = folder / f"{name}.compressed.onnx"
        start = time.perf_counter()
        compress(src, calib, output=dst, force=True, **options)
        seconds = time.perf_counter() - start
        out = _session(dst).run([entry["y"]], feeds)[0].astype(np.float64)
        sizes = file_sizes(dst)
        record = {
            "model": name,
            "setting": label,
            "pruned": "ratio" in options or "pattern" in options,
            "mse": float(np.square(out - reference).mean()),
            "raw_bytes": sizes.raw,
            "gzip_bytes": sizes.gzip,
            "seconds": seconds,
        }
        records.append(record)
        print(f"{name:24s} {label:22s} mse {record['mse']:.3e} gzip {sizes.gzip:>9,}", flush=True)
    return records


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point dominates (smaller or equal gzip and MSE, one strictly)."""
    return [
        p
        for p in points
        if not any(_dominates(q, p) for q in points if q is not p)
    ]  # fmt: skip


def _dominates(a: dict, b: dict) -> bool:
    no_worse = a["gzip_bytes"] <= b["gzip_bytes"] and a["mse"] <= b["mse"]
    return no_worse and (a["gzip_bytes"] < b["gzip_bytes"] or a["mse"] < b["mse"])


def report(records: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = sorted((r for r in records if r["model"] == model), key=lambda r: r["gzip_bytes"])
        alone = frontier([r for r in rows if not r["pruned"]])
        pruned = [r for r in rows if r["pruned"]]
        both = frontier(rows)
        lines += [
            f"### {model}",
            "",
            "| setting | gzip -9, B | raw, B | output MSE | on the frontier of |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            marks = [
                label for label, front in (("quant alone", alone), ("all", both)) if r in front
            ]  # fmt: skip
            lines.append(
                f"| {r['setting']} | {r['gzip_bytes']:,} | {r['raw_bytes']:,} | {r['mse']:.3g} "
                f"| {', '.join(marks) or ''} |"
            )
        wins = [
            f"- {p['setting']} ({p['gzip_bytes']:,} B, MSE {p['mse']:.3g}) dominates "
            f"{a['setting']} ({a['gzip_bytes']:,} B, MSE {a['mse']:.3g})"
            for p in pruned
            for a in alone
            if _dominates(p, a)
        ]
        none = "- no pruned + quantized file dominates a quantization-alone frontier point"
        lines += ["", *(wins or [none]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="the corpus models (not needed for the MLP)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--mlp-calib-rows", type=int, default=256,
        help="the MLP's calibration rows (at most its 1437 training rows)",
    )  # fmt: skip
    args = parser.parse_args()
    manifest = {}
    if any(name != LARGE_MLP for name in args.models):
        if args.corpus is None:
            parser.error("--corpus DIR is needed for the corpus models")
        manifest = {e["name"]: e for e in json.loads((args.corpus / "manifest.json").read_text())}
    records = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in args.models:
            mlp = name == LARGE_MLP
            entry = build_large_mlp(folder, args.mlp_calib_rows) if mlp else manifest[name]
            corpus = folder if mlp else args.corpus
            records += measure(entry, corpus, folder)
    header = (
        f"One run, {(time.perf_counter() - started) / 60:.0f} min, one onnxruntime thread, on a "
        f"shared 2-core VM. `python -m benchmarks.quantize_pareto{_arguments(args)}`.\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_pareto.json").write_text(json.dumps(records, indent=1))
    (args.out / "quantize_pareto.md").write_text(header + report(records) + "\n")
    print(header + report(records))


def _arguments(args: argparse.Namespace) -> str:
    """The command line's options that shaped the records, as the header quotes them."""
    text = " --corpus DIR" if args.corpus is not None else ""
    if args.models != list(MODELS):
        text += " --models " + " ".join(args.models)
    if args.mlp_calib_rows != 256:
        text += f" --mlp-calib-rows {args.mlp_calib_rows}"
    return text


if __name__ == "__main__":
    main()
