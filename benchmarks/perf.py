"""Compress speed and memory at scale: MLPs of about 1M, 10M and 100M dense weights.

    python benchmarks/perf.py [--sizes 1e6 1e7 1e8] [--rows 256 1024 4096] [--outputs 10 1000]
                              [--methods ec ecr] [--max-rss-gb 20] [--timeout 900]
                              [--profile CASE] [--precision]
    python benchmarks/perf.py --quick          # tiny cases only (the smoke test)

Each case builds x → Gemm → Relu → Gemm → Relu → Gemm → y (input width = hidden width h,
`--outputs` units at the end, h chosen so that 2h² + h·out ≈ the size; normal weights scaled
1/sqrt(in); external data above 256 MiB) and a random calibration NPZ, then runs one child
process that

1. calls `ecprune_onnx.compress(..., method=M, ratio=0.5, device=--device)` (M from `--methods`,
   default `ec`; with several, each case runs once per method, one after the other, and a
   table compares each with `ec`), timing every
   stage by wrapping the functions `compress()` calls (a benchmark-side instrument: the
   library is not changed) and sampling the resident memory while each stage runs (with
   `--device cuda` also torch's CUDA peak, `torch.cuda.max_memory_allocated`);
2. after that (so onnxruntime's copy of the weights is not in compress's peak) runs one
   onnxruntime forward pass over the same rows: one untimed warm-up, then the best of five
   timed passes (the rate onnxruntime reaches, less exposed to other load on the machine).

FLOP model (P dense weights, n rows, K probe vectors): forward 2nP; the probe backward
carries one vector per probe back through every layer but the first to its input, ≈ 2nP per
probe (an upper bound: the first layer's input gradient is not needed); S1 = CᵀA and
S2 = Cᵀ(A∘A) are two GEMMs of 2nP each. F = (1 + K + 2)·2nP. R = 2nP / t_onnxruntime, and
the target is t_compress ≤ 1.3·F/R. The child's peak RSS comes from wait4; a watchdog kills
it above `--max-rss-gb`. Prints markdown tables: the cases, the time split, the per-stage
memory, the fitted scaling exponents (log-log least squares) and, with `--precision`, the
float32-vs-float64 error of the S1/S2 products. `--profile 10M/1024/10` adds a cProfile
of that case (its times then include the profiler's overhead). `--merge a.json b.json`
reprints the tables of earlier `--json` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

try:
    from benchmarks.memory_watch import watch_memory
except ImportError:  # run as `python benchmarks/<this script>.py`
    from memory_watch import watch_memory

GIB = 1024**3
EXTERNAL_DATA_BYTES = 256 * 1024**2  # above this the model is saved with external data
BATCH_SIZE = 256  # compress's default --batch-size
EXACT_PROBE_LIMIT = 16  # compress's default --probes
# --quick: two tiny cases (Hutchinson probes, the general path), enough to fit an exponent
# in rows; the smoke test must stay under 20 s and each case is a fresh child process.
QUICK = {"sizes": [2e4], "rows": [64, 256], "outputs": [40]}


@dataclass
class Case:
    params: float  # requested dense weights
    rows: int
    outputs: int
    method: str = "ec"

    @property
    def label(self) -> str:
        tail = "" if self.method == "ec" else f"/{self.method}"
        return f"{_short(self.params)}/{self.rows}/{self.outputs}{tail}"


@dataclass
class Result:
    case: Case
    weights: int = 0  # actual dense weights
    hidden: int = 0
    probes: int = 0
    exact: bool = True
    status: str = "ok"
    compress_s: float = math.nan
    ort_s: float = math.nan
    peak_rss_gib: float = math.nan  # the child's peak, all of it
    baseline_rss_gib: float = math.nan  # after imports, before compress
    cuda_peak_gib: float = math.nan  # torch's CUDA peak during compress; nan on the CPU
    ort_provider: str = "CPUExecutionProvider"  # where onnxruntime's reference pass ran
    torch_cuda_s: float = math.nan  # the same forward in torch on the GPU; nan on the CPU
    batch_size: int = BATCH_SIZE  # compress's --batch-size in this case
    stages: dict = field(default_factory=dict)  # label → {"seconds", "peak_gib"}
    profile: str = ""

    @property
    def forward_flops(self) -> float:
        return 2.0 * self.case.rows * self.weights

    @property
    def method_flops(self) -> float:
        """F: forward + K probe backwards + the S1/S2 GEMMs, in forward-pass units."""
        return (1 + self.probes + 2) * self.forward_flops

    @property
    def ort_rate(self) -> float:
        return self.forward_flops / self.ort_s

    @property
    def ratio(self) -> float:
        """t_compress / (F / R): 1 means compress runs at onnxruntime's FLOP rate."""
        return self.compress_s / (self.method_flops / self.ort_rate)

    @property
    def bytes_per_weight(self) -> float:
        """The peak RSS above the baseline per dense weight (issue #18's budget: 24 at 100M)."""
        return (self.peak_rss_gib - self.baseline_rss_gib) * GIB / self.weights

    @property
    def memory_budget_gib(self) -> float:
        """5 × the float32 weight bytes + one batch's activations (every layer's input and
        output, float32), the issue's allowance."""
        widths = self.hidden * 3 + self.case.outputs  # x, two hidden layers, y
        batch = min(self.batch_size, self.case.rows) * widths * 4
        return (5 * 4 * self.weights + batch) / GIB


def _short(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


# ----------------------------------------------------------------------------- build


def hidden_width(params: float, outputs: int) -> int:
    """h with 2h² + h·out ≈ params (input width h, two h×h layers, one out×h layer)."""
    return max(2, round((-outputs + math.sqrt(outputs**2 + 8 * params)) / 4))


def build_model(folder: Path, params: float, outputs: int, seed: int = 0) -> tuple[Path, int]:
    """The three-layer MLP; returns (path, hidden width)."""
    width = hidden_width(params, outputs)
    rng = np.random.default_rng(seed)
    shapes = [("fc1", width, width), ("fc2", width, width), ("fc3", outputs, width)]
    initializers, nodes, current = [], [], "x"
    for index, (name, out_features, in_features) in enumerate(shapes):
        weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
        weight *= np.float32(1 / math.sqrt(in_features))
        bias = rng.standard_normal(out_features, dtype=np.float32) * np.float32(0.1)
        initializers += [
            numpy_helper.from_array(weight, f"{name}.w"),
            numpy_helper.from_array(bias, f"{name}.b"),
        ]
        last = index == len(shapes) - 1
        z = "y" if last else f"{name}.z"
        nodes.append(
            helper.make_node("Gemm", [current, f"{name}.w", f"{name}.b"], [z], name, transB=1)
        )
        if not last:
            nodes.append(helper.make_node("Relu", [z], [f"{name}.h"], f"{name}.relu"))
            current = f"{name}.h"
        del weight  # the proto holds its own copy: keep the parent's footprint to one
    graph = helper.make_graph(
        nodes,
        "perf_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", outputs])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = folder / f"mlp-{_short(params)}-{outputs}.onnx"
    external = 4 * params > EXTERNAL_DATA_BYTES
    onnx.save_model(model, path, save_as_external_data=external, location=path.name + ".data")
    return path, width


def write_calib(folder: Path, rows: int, width: int, seed: int = 1) -> Path:
    x = np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)
    path = folder / f"calib-{width}-{rows}.npz"
    np.savez(path, x=x)
    return path


# ------------------------------------------------------------------------------ child


def rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StageRecorder:
    """Wall time and peak RSS of named stages: a wrapper around each function compress()
    calls, and a thread that samples RSS every 5 ms into every stage currently running
    (so a nested stage's peak also counts for its parent)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}
        self.active: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = rss_bytes()
            for label in list(self.active):
                entry = self.stages[label]
                entry["peak_gib"] = max(entry["peak_gib"], rss / GIB)

    def wrap(self, owner, attribute: str, label: str) -> None:
        function = getattr(owner, attribute)

        def timed(*args, **kwargs):
            entry = self.stages.setdefault(label, {"seconds": 0.0, "peak_gib": 0.0, "calls": 0})
            entry["peak_gib"] = max(entry["peak_gib"], rss_bytes() / GIB)
            self.active.append(label)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                entry["seconds"] += time.perf_counter() - started
                entry["calls"] += 1
                self.active.remove(label)

        setattr(owner, attribute, timed)


# (module, function, label): the stages of compress() in the order they run. Labels with a
# "/" are nested in the stage before the slash. Patched by name in the module that calls
# them, so the library runs unchanged.
STAGES = [
    ("ecprune_onnx.modelio", "load_model", "load ONNX (compress + measure)"),
    ("ecprune_onnx.compress", "open_session", "onnxruntime sessions"),
    ("ecprune_onnx.compress", "find_dense_layers", "find layers"),
    ("ecprune_onnx.compress", "_check_finite", "finite check"),
    ("ecprune_onnx.compress", "_statistics", "statistics"),
    ("ecprune_onnx.compress", "instrument", "statistics/instrument graph"),
    ("ecprune_onnx.compress", "TorchGraph", "statistics/convert to torch"),
    ("ecprune_onnx.compress", "check_parity", "statistics/parity check"),
    ("ecprune_onnx.compress", "collect_stats", "statistics/stream batches"),
    ("ecprune_onnx.stats", "_squared_jacobian_norms", "statistics/stream batches/probe backward"),
    ("ecprune_onnx.stats", "_accumulate", "statistics/stream batches/S0 S1 S2 products"),
    ("ecprune_onnx.compress", "_prune_round", "prune"),
    ("ecprune_onnx.compress", "_method_scores", "prune/scores"),
    ("ecprune_onnx.compress", "_damage_scores", "prune/scores"),  # ec, sensitivity
    ("ecprune_onnx.compress", "choose_masks", "prune/masks (global threshold)"),
    ("ecprune_onnx.compress", "_bias_shifts", "prune/bias shifts"),
    ("ecprune_onnx.compress", "predicted_damage", "prune/predicted damage"),
    ("ecprune_onnx.compress", "rewrite", "prune/rewrite"),
    ("ecprune_onnx.compress", "reconstruct_layers", "reconstruct"),  # ecr, sparsegpt, obc
    ("ecprune_onnx.sequential", "allocate_sparsity", "reconstruct/budget across layers"),
    ("ecprune_onnx.sequential", "layer_inputs", "reconstruct/layer-input passes"),
    ("ecprune_onnx.sequential", "_loss_increments", "reconstruct/loss curves"),
    ("ecprune_onnx.sequential", "_dense_optimum", "reconstruct/dense refit W*"),
    ("ecprune_onnx.reconstruct", "centred", "reconstruct/layer solves"),
    ("ecprune_onnx.sequential", "replace_parameters", "reconstruct/write weights"),
    ("onnx.checker", "check_model", "checker"),
    ("ecprune_onnx.modelio", "stage_model", "save"),
    ("ecprune_onnx.compress", "_original_outputs", "measured deviation"),  # the input's pass
    ("ecprune_onnx.compress", "_measured_deviation", "measured deviation"),
]


STREAM = "statistics/stream batches"


def _install_stages(recorder: StageRecorder) -> None:
    import importlib

    for module_name, attribute, label in STAGES:
        recorder.wrap(importlib.import_module(module_name), attribute, label)


def _time_onnxruntime(model: str, x: np.ndarray, device: str) -> tuple[float, str]:
    """The best of five forward passes over all rows, after one untimed warm-up: the rate
    onnxruntime reaches, not one slowed by whatever else runs on the machine. On the CUDA
    provider when compress ran on the GPU and onnxruntime can use it (the library's own
    choice, `runtime.session_providers`). Returns (seconds, provider)."""
    import onnxruntime

    from ecprune_onnx.runtime import session_providers, with_options

    providers = session_providers("cpu" if device == "cpu" else "auto")
    session = onnxruntime.InferenceSession(model, providers=with_options(providers))
    feeds = {"x": x}
    if providers[0] == "CUDAExecutionProvider":  # inputs on the GPU already, as torch's are
        feeds = {"x": onnxruntime.OrtValue.ortvalue_from_numpy(x, "cuda", 0)}
    session.run(None, feeds)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return min(times), session.get_providers()[0]


def _time_torch_cuda(model: str, x: np.ndarray) -> float:
    """The best of five float32 forward passes of the same MLP in torch on the GPU (inputs
    already there): the GPU's own rate for this arithmetic, whatever onnxruntime offers."""
    import torch

    from ecprune_onnx.layers import find_dense_layers
    from ecprune_onnx.modelio import load_model

    layers = find_dense_layers(load_model(model)).layers
    params = [
        (
            torch.tensor(layer.weight.T, dtype=torch.float32, device="cuda"),
            torch.tensor(layer.bias, dtype=torch.float32, device="cuda"),
        )
        for layer in layers
    ]
    a = torch.from_numpy(x).cuda()

    def forward() -> None:
        h = a
        for index, (weight, bias) in enumerate(params):
            h = torch.addmm(bias, h, weight)
            h = torch.relu(h) if index + 1 < len(params) else h
        torch.cuda.synchronize()

    forward()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        forward()
        times.append(time.perf_counter() - started)
    return min(times)


def run_child(spec: dict) -> dict:
    """One case inside the child process; returns what the parent reports."""
    import onnxruntime  # noqa: F401 - imported before the baseline, like the library's own
    import torch

    import ecprune_onnx

    baseline = rss_bytes()
    recorder = StageRecorder()
    _install_stages(recorder)
    recorder.start()
    device = spec["device"]
    arguments = dict(
        method=spec["method"], ratio=0.5, device=device, force=True, batch_size=spec["batch_size"]
    )
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if spec["profile"]:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(
            ecprune_onnx.compress, spec["model"], spec["calib"], output=spec["out"], **arguments
        )
    else:
        result = ecprune_onnx.compress(
            spec["model"], spec["calib"], output=spec["out"], **arguments
        )
    compress_s = time.perf_counter() - started
    recorder.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda_peak = math.nan
    if device != "cpu" and torch.cuda.is_available():
        cuda_peak = torch.cuda.max_memory_allocated() / GIB
    profile = ""
    if spec["profile"]:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(20)
        profile = stream.getvalue()
    x = np.load(spec["calib"])["x"]
    ort_s, ort_provider = _time_onnxruntime(spec["model"], x, device)
    on_gpu = device != "cpu" and torch.cuda.is_available()
    return {
        "compress_s": compress_s,
        "ort_s": ort_s,
        "ort_provider": ort_provider,
        "torch_cuda_s": _time_torch_cuda(spec["model"], x) if on_gpu else math.nan,
        "peak_rss_gib": peak / GIB,
        "baseline_rss_gib": baseline / GIB,
        "cuda_peak_gib": cuda_peak,
        "stages": recorder.stages,
        "probes": result.probes,
        "profile": profile,
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- parent


# What the child reports, copied onto the Result.
CHILD_FIELDS = (
    "compress_s",
    "ort_s",
    "ort_provider",
    "torch_cuda_s",
    "baseline_rss_gib",
    "cuda_peak_gib",
    "stages",
    "profile",
)


def run_case(case: Case, folder: Path, args) -> Result:
    model, width = build_model(folder, case.params, case.outputs)
    calib = write_calib(folder, case.rows, width)
    result = Result(case=case, hidden=width, weights=2 * width * width + case.outputs * width)
    result.batch_size = args.batch_size
    result.probes = min(case.outputs, EXACT_PROBE_LIMIT)
    result.exact = case.outputs <= EXACT_PROBE_LIMIT
    spec = {
        "model": str(model),
        "calib": str(calib),
        "out": str(folder / "pruned.onnx"),
        "profile": args.profile == case.label,
        "device": args.device,
        "batch_size": args.batch_size,
        "method": case.method,
    }
    answer = folder / "answer.json"
    command = [sys.executable, __file__, "--child", json.dumps(spec), "--answer", str(answer)]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a traceback cannot block it
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        killed: list[str] = []
        watchdog = threading.Thread(target=watch_memory, args=(process, args.max_rss_gb, killed))
        watchdog.daemon = True
        watchdog.start()
        timer = threading.Timer(args.timeout, lambda: _kill(process, killed, args.timeout))
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)  # wait4: this child's own peak RSS
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
    result.peak_rss_gib = usage.ru_maxrss * 1024 / GIB
    if process.returncode != 0 or not answer.exists():
        result.status = (
            killed[0]
            if killed
            else f"exit {process.returncode}: " + (lines[-1][:200] if lines else "")
        )
    else:
        data = json.loads(answer.read_text())
        for key in CHILD_FIELDS:
            setattr(result, key, data[key])
    _remove_case_files(folder)
    return result


def _kill(process: subprocess.Popen, killed: list[str], seconds: float) -> None:
    if process.poll() is None:
        killed.append(f"killed after {seconds:g} s")
        os.killpg(process.pid, signal.SIGKILL)


def _remove_case_files(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


# ----------------------------------------------------------------------------- report


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x (least squares); nan with fewer than two points."""
    if len(xs) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def exponents(results: list[Result]) -> list[tuple[str, str, float, float]]:
    """(varied, held fixed, slope of compress time, slope of the batch loop's time): in rows
    for each model, in parameters for each (rows, outputs). The batch loop is the part that
    should grow with rows × parameters; the rest of compress shows up as the difference."""
    ok = [r for r in results if r.status == "ok" and r.case.method == "ec"]
    fits = []
    groupings = (
        ("rows", lambda r: (r.case.params, r.case.outputs), lambda r: r.case.rows),
        ("parameters", lambda r: (r.case.rows, r.case.outputs), lambda r: r.weights),
    )
    for varied, key, x in groupings:
        for fixed in sorted({key(r) for r in ok}):
            group = [r for r in ok if key(r) == fixed]
            xs = [x(r) for r in group]
            total = fit_exponent(xs, [r.compress_s for r in group])
            loop = fit_exponent(xs, [_stage_seconds(r, STREAM) for r in group])
            if varied == "rows":
                label = f"{_short(fixed[0])} weights, {fixed[1]} outputs"
            else:
                label = f"{fixed[0]} rows, {fixed[1]} outputs"
            fits.append((varied, label, total, loop))
    return [fit for fit in fits if not math.isnan(fit[2])]


def _stage_seconds(result: Result, label: str) -> float:
    return result.stages.get(label, {}).get("seconds", 0.0)


def results_table(results: list[Result]) -> str:
    lines = [
        "| method | weights | out | rows | batch | probes | compress s | ort fwd s | R GFLOP/s "
        "| F GFLOP | achieved GFLOP/s | t / (F/R) | stats s | peak RSS GiB | above baseline GiB "
        "| bytes / weight | budget GiB | status |",
        "|" + "---|" * 18,
    ]
    for r in results:
        kind = "exact" if r.exact else "Hutch."
        head = (
            f"| {r.case.method} | {r.weights:,} | {r.case.outputs} | {r.case.rows} "
            f"| {r.batch_size} | {r.probes} {kind} "
        )
        if r.status != "ok":
            dashes = " | ".join(["–"] * 7)  # compress s … stats s
            lines.append(
                f"{head}| {dashes} | {r.peak_rss_gib:.2f} | – | – | {r.memory_budget_gib:.2f} "
                f"| {r.status} |"
            )
            continue
        lines.append(
            head + f"| {r.compress_s:.2f} | {r.ort_s:.4f} | {r.ort_rate / 1e9:.1f} "
            f"| {r.method_flops / 1e9:.1f} | {r.method_flops / r.compress_s / 1e9:.1f} "
            f"| {r.ratio:.1f} | {_stage_seconds(r, 'statistics'):.2f} | {r.peak_rss_gib:.2f} "
            f"| {r.peak_rss_gib - r.baseline_rss_gib:.2f} | {r.bytes_per_weight:.2f} "
            f"| {r.memory_budget_gib:.2f} | ok |"
        )
    return "\n".join(lines)


def stages_table(results: list[Result]) -> str:
    """Seconds (and peak RSS GiB) of every stage, one column per case."""
    ok = [r for r in results if r.status == "ok"]
    labels = list(dict.fromkeys(label for _, _, label in STAGES))  # a label may wrap two
    header = "| stage | " + " | ".join(r.case.label for r in ok) + " |"
    lines = [header, "|" + "---|" * (len(ok) + 1)]
    for label in labels:
        if not any(label in r.stages for r in ok):
            continue
        depth = label.count("/")
        name = "  " * depth + ("↳ " if depth else "") + label.rsplit("/", 1)[-1]
        cells = []
        for r in ok:
            entry = r.stages.get(label)
            cells.append(f"{entry['seconds']:.2f} s, {entry['peak_gib']:.2f} G" if entry else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total compress** | " + " | ".join(f"{r.compress_s:.2f} s" for r in ok) + " |")
    return "\n".join(lines)


def exponents_table(results: list[Result]) -> str:
    lines = [
        "| against | held fixed | exponent of compress time | exponent of the batch loop |",
        "|---|---|---|---|",
    ]
    for varied, fixed, total, loop in exponents(results):
        lines.append(f"| {varied} | {fixed} | {total:.2f} | {loop:.2f} |")
    return "\n".join(lines)


def marginal_costs(results: list[Result]) -> list[tuple[str, int, int, float]]:
    """(case, fewer rows, more rows, marginal ratio) for every two row counts of one case
    (weights, outputs, method): the extra compress time of the extra rows over their F/R,
    (t_more - t_fewer) / (F_more/R_more - F_fewer/R_fewer). The fixed costs (conversion,
    parity check, masks, the measured deviation) cancel out."""
    ok = [r for r in results if r.status == "ok"]
    costs = []
    for key in dict.fromkeys((r.case.params, r.case.outputs, r.case.method) for r in ok):
        same = [r for r in ok if (r.case.params, r.case.outputs, r.case.method) == key]
        runs = sorted(same, key=lambda r: r.case.rows)
        for fewer, more in zip(runs, runs[1:]):
            extra_work = more.method_flops / more.ort_rate - fewer.method_flops / fewer.ort_rate
            ratio = (more.compress_s - fewer.compress_s) / extra_work
            label = f"{_short(key[0])}/{key[1]}" + ("" if key[2] == "ec" else f"/{key[2]}")
            costs.append((label, fewer.case.rows, more.case.rows, ratio))
    return costs


def time_targets_table(results: list[Result]) -> str:
    """Issue #18's time targets: the batch loop over F/R for each case, and the marginal cost
    of calibration rows over their F/R (`marginal_costs`)."""
    lines = ["| case | batch loop s | F/R s | batch loop / (F/R) |", "|---|---|---|---|"]
    for r in results:
        if r.status == "ok":
            ideal = r.method_flops / r.ort_rate
            loop = _stage_seconds(r, STREAM)
            lines.append(f"| {r.case.label} | {loop:.2f} | {ideal:.2f} | {loop / ideal:.2f} |")
    lines += ["", "| case | rows | marginal cost / (F/R) |", "|---|---|---|"]
    for label, fewer, more, ratio in marginal_costs(results):
        lines.append(f"| {label} | {fewer} → {more} | {ratio:.2f} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------- precision


def precision_check(rows: int = 4096, width: int = 2236, seed: int = 0) -> str:
    """S1 = CᵀA and S2 = Cᵀ(A∘A) per batch in float32 (summed in float64 across batches)
    against float64 throughout, on one hidden layer's shape: error and time of each, and how
    many of the 50% mask decisions of the EC score change."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    activations = torch.relu(torch.randn(rows, width, generator=generator, dtype=torch.float64))
    c = torch.rand(rows, width, generator=generator, dtype=torch.float64) ** 2
    weight = torch.randn(width, width, generator=generator, dtype=torch.float64).numpy()
    sums = {}
    for dtype in (torch.float64, torch.float32):
        s1 = np.zeros((width, width))
        s2 = np.zeros((width, width))
        gemm_s = 0.0  # the two products alone: the casts and the float64 sums are the same
        for start in range(0, rows, BATCH_SIZE):
            a = activations[start : start + BATCH_SIZE].to(dtype)
            cb = c[start : start + BATCH_SIZE].to(dtype)
            squares = a.square()
            started = time.perf_counter()
            p1, p2 = cb.T @ a, cb.T @ squares
            gemm_s += time.perf_counter() - started
            s1 += p1.double().numpy()
            s2 += p2.double().numpy()
        sums[dtype] = (s1, s2, gemm_s)
    s0 = c.sum(0).numpy()[:, None]
    (r1, r2, t64), (f1, f2, t32) = sums[torch.float64], sums[torch.float32]
    score64 = weight**2 * (r2 - r1**2 / s0)
    score32 = weight**2 * (f2 - f1**2 / s0)
    threshold64 = np.median(score64)
    threshold32 = np.median(score32)
    flipped = float(np.mean((score64 <= threshold64) != (score32 <= threshold32)))
    return "\n".join(
        [
            "| products | GEMM seconds | max rel. error S1 | max rel. error S2 "
            "| max rel. error of S2 − S1²/S0 | mask decisions changed |",
            "|---|---|---|---|---|---|",
            f"| float64 | {t64:.2f} | 0 | 0 | 0 | 0 |",
            f"| float32, float64 across batches | {t32:.2f} | {_rel(f1, r1):.1e} "
            f"| {_rel(f2, r2):.1e} | {_rel(f2 - f1**2 / s0, r2 - r1**2 / s0):.1e} "
            f"| {flipped:.2e} |",
            f"\n({rows} rows in batches of {BATCH_SIZE}, a {width}×{width} layer, ReLU "
            "activations, c = uniform²)",
        ]
    )


def _rel(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(value - reference) / np.maximum(np.abs(reference), 1e-300)))


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--outputs", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--quick", action="store_true", help="tiny cases only (smoke test)")
    parser.add_argument("--device", default="cpu", help="compress's --device (cpu, cuda, auto)")
    parser.add_argument(
        "--methods", nargs="+", default=["ec"], help="compress's --method, each case in turn"
    )
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="compress's --batch-size"
    )
    parser.add_argument("--max-rss-gb", type=float, default=20.0, help="watchdog (GiB)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--profile", metavar="CASE", help="cProfile one case, e.g. 10M/1024/10")
    parser.add_argument("--precision", action="store_true", help="float32 vs float64 S1/S2")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--merge", type=Path, nargs="+", help="report earlier --json files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rows, args.outputs = QUICK["sizes"], QUICK["rows"], QUICK["outputs"]
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.child:
        args.answer.write_text(json.dumps(run_child(json.loads(args.child))))
        return []
    if args.merge:
        results = [
            _result_from_dict(item) for p in args.merge for item in json.loads(p.read_text())
        ]
        print(report(results))
        return results
    cases = [
        Case(s, r, o, m)
        for s in args.sizes
        for o in args.outputs
        for r in args.rows
        for m in args.methods
    ]
    results = []
    folder = Path(tempfile.mkdtemp(prefix="ecprune-perf-"))
    try:
        for case in cases:
            result = run_case(case, folder, args)
            print(
                f"{case.label}: {result.status}, compress {result.compress_s:.2f} s, "
                f"ratio {result.ratio if result.status == 'ok' else math.nan:.2f}, "
                f"peak {result.peak_rss_gib:.2f} GiB",
                flush=True,
            )
            results.append(result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{_machine()}\n")
    print(report(results))
    print("\n".join(["", *[r.profile for r in results if r.profile]]))
    if args.precision:
        print("\n" + precision_check())
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


def report(results: list[Result]) -> str:
    tables = [
        results_table(results),
        stages_table(results),
        exponents_table(results),
        time_targets_table(results),
    ]
    if len({r.case.method for r in results}) > 1:
        tables.insert(1, methods_table(results))
    on_cuda = [r for r in results if math.isfinite(r.cuda_peak_gib)]
    if on_cuda:
        tables.insert(1, cuda_table(on_cuda))
    return "\n\n".join(tables)


def methods_table(results: list[Result]) -> str:
    """Each method against `ec` on the same case, run one after the other: time and peak
    RSS above the baseline, and their ratios."""
    ok = {(r.case.params, r.case.rows, r.case.outputs, r.case.method): r for r in results}
    lines = [
        "| case | method | compress s | ec s | time / ec | above baseline GiB | ec GiB "
        "| memory / ec |",
        "|" + "---|" * 8,
    ]
    for (params, rows, outputs, method), r in ok.items():
        ec = ok.get((params, rows, outputs, "ec"))
        if method == "ec" or ec is None or r.status != "ok" or ec.status != "ok":
            continue
        mine, theirs = r.peak_rss_gib - r.baseline_rss_gib, ec.peak_rss_gib - ec.baseline_rss_gib
        lines.append(
            f"| {_short(params)}/{rows}/{outputs} | {method} | {r.compress_s:.2f} "
            f"| {ec.compress_s:.2f} | {r.compress_s / ec.compress_s:.2f} | {mine:.2f} "
            f"| {theirs:.2f} | {mine / theirs:.2f} |"
        )
    return "\n".join(lines)


def cuda_table(results: list[Result]) -> str:
    """GPU runs: torch's CUDA peak, onnxruntime's provider, and the ratio against torch's
    own forward on the GPU (t_compress / (F / R_torch)) beside the onnxruntime one."""
    lines = [
        "| case | CUDA peak GiB | onnxruntime provider | ort fwd s | torch CUDA fwd s "
        "| t / (F/R_ort) | t / (F/R_torch) |",
        "|" + "---|" * 7,
    ]
    for r in results:
        torch_ratio = r.compress_s / ((3 + r.probes) * r.torch_cuda_s)
        lines.append(
            f"| {r.case.label} | {r.cuda_peak_gib:.2f} | {r.ort_provider} | {r.ort_s:.4f} "
            f"| {r.torch_cuda_s:.4f} | {r.ratio:.1f} | {torch_ratio:.1f} |"
        )
    return "\n".join(lines)


def _result_from_dict(item: dict) -> Result:
    return Result(case=Case(**item.pop("case")), **item)


def _machine() -> str:
    import onnxruntime
    import torch

    return (
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), onnxruntime {onnxruntime.__version__}, numpy {np.__version__}"
    )


if __name__ == "__main__":
    main()
