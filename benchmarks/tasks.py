"""The paper reproduction's tasks: data, MLP training, ONNX export and the test loss.

Two tasks, as in Ballini et al. (arXiv 2602.20467):

* ``digits``: classification of scikit-learn's bundled 8x8 digits (the stand-in for MNIST,
  which cannot be downloaded here), cross-entropy loss, the split of ``samples/``.
* ``ds``: regression of the PDEBench diffusion-sorption solution ``u(x, t)`` from noisy
  samples (``benchmarks/diffusion_sorption.py``), mean squared error against clean targets.

Every model is a tanh MLP exported as a chain of ONNX ``Gemm`` nodes, input ``x``, output
``y``; every loss is computed by onnxruntime on the exported file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.diffusion_sorption import make_dataset

ROOT = Path(__file__).resolve().parents[1]
T_SCALE = 500.0  # t in [0, 500]: divided by this so both inputs are in [0, 1]
DS_SAMPLES = 5000  # points of the 101 x 256 space-time grid; 20 % held out for the test


@dataclass(frozen=True)
class TaskData:
    """Arrays of one task instance: train (what training and fine-tuning see), calibration
    (drawn from train), test (held out; clean targets for ``ds``)."""

    name: str  # "digits" or "ds"
    noise: float
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classification(self) -> bool:
        return self.name == "digits"

    @property
    def sizes_in_out(self) -> tuple[int, int]:
        n_out = 10 if self.classification else 1
        return self.x_train.shape[1], n_out


def _make_samples_module():
    """``samples/make_samples.py`` is a script, not a package: load it from its path."""
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "samples/make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pick(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` distinct rows out of ``n`` (the calibration subset)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def load_task(name: str, noise: float, seed: int, calib_rows: int) -> TaskData:
    """One task instance; the data split is fixed, ``seed`` draws the calibration rows."""
    if name == "digits":
        x_train, y_train, x_test, y_test = _make_samples_module().load_split(seed=0)
    elif name == "ds":
        data = make_dataset(noise, DS_SAMPLES, seed=0)
        scale = np.array([1.0, 1.0 / T_SCALE], dtype=np.float32)
        x_train, y_train = data["train_points"] * scale, data["train_targets"]
        x_test, y_test = data["test_points"] * scale, data["test_targets"]
    else:
        raise ValueError(f"unknown task {name}")
    idx = _pick(len(x_train), calib_rows, seed)
    return TaskData(name, noise, x_train, y_train, x_train[idx], y_train[idx], x_test, y_test)


class MLP(torch.nn.Module):
    """``fc1 .. fcN`` Linear layers with tanh between them and nothing after the last."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def dense_weight_count(sizes: list[int]) -> int:
    """Weights (biases excluded: the paper's pruning ratio counts weights) of an MLP."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def loss_fn(classification: bool):
    return torch.nn.functional.cross_entropy if classification else torch.nn.functional.mse_loss


@contextlib.contextmanager
def _one_thread_seeded(seed: int):
    """Seed torch and train on one thread: workers run side by side on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_mlp(
    task: TaskData, sizes: list[int], seed: int, epochs: int, batch_size: int, lr: float
) -> MLP:
    """Adam on minibatches of the training split; returns the model in eval mode."""
    criterion = loss_fn(task.classification)
    with _one_thread_seeded(seed):
        model = MLP(sizes)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        # Cosine decay: the regression task needs a small final step to fit well.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        x, y = torch.from_numpy(task.x_train), torch.from_numpy(task.y_train)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad()
                criterion(model(x[idx]), y[idx]).backward()
                opt.step()
            sched.step()
    return model.eval()


def export_onnx(model: MLP, path: Path) -> None:
    """TorchScript export (one Gemm per layer), opset 17, IR version 8 for onnxruntime 1.31."""
    buf = io.BytesIO()
    example = torch.zeros(1, model.layers[0].in_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo=False is deliberate: plain Gemm nodes
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, 8)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Inputs as ``x``, labels or targets as ``y`` (int64 classes or float32 [n, 1])."""
    np.savez(path, x=np.ascontiguousarray(x, np.float32), y=np.ascontiguousarray(y))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def held_out_metrics(path: Path, task: TaskData) -> dict[str, float]:
    """The paper's test loss, by onnxruntime: mean cross-entropy (digits, plus accuracy) or
    mean squared error against the clean targets (ds)."""
    out = run_onnx(path, task.x_test).astype(np.float64)
    if task.classification:
        shifted = out - out.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_probs[np.arange(len(out)), task.y_test].mean()
        return {"loss": float(loss), "accuracy": float((out.argmax(1) == task.y_test).mean())}
    return {"loss": float(np.mean((out - task.y_test) ** 2))}


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its task, noise level, layer sizes and training recipe."""

    name: str
    task: str
    noise: float
    sizes: tuple[int, ...]
    epochs: int
    lr: float


def prepare(spec: ModelSpec, seed: int, folder: Path, calib_rows: int):
    """Train, export and write the calibration NPZ of one model and seed:
    (task data, model path, calibration NPZ path)."""
    task = load_task(spec.task, spec.noise, seed, calib_rows)
    model = train_mlp(task, list(spec.sizes), seed, spec.epochs, 64, spec.lr)
    path = folder / f"{spec.task}-{'-'.join(map(str, spec.sizes))}-{seed}.onnx"
    export_onnx(model, path)
    calib = path.with_suffix(".calib.npz")
    write_npz(calib, task.x_calib, task.y_calib)
    return task, path, calib


def write_results(folder: Path, stem: str, records: list[dict], tables: str, seconds: float) -> str:
    """`<stem>.json` (the records) and `<stem>.md` (a machine line, then the tables) in
    `folder`; returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(records, indent=1))
    header = (
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} "
        f"cores, onnxruntime {ort.__version__}; total {seconds:.0f} s.\n\n"
    )
    text = header + tables + "\n"
    (folder / f"{stem}.md").write_text(text)
    return text


def add_run_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options the model-by-seed benchmarks share: --quick, --seeds, --models, --out."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="*", help="names (prefixes) of the models to run")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder of the results (default: benchmarks/results; with --quick a new "
        "temporary folder, so a smoke run never replaces the committed results)",
    )


def results_folder(out: Path | None, quick: bool, committed: Path, name: str) -> Path:
    """--out, or where a run's results go without it: the `committed` folder of the full
    run, or for a quick run a new temporary folder (`git status` stays clean)."""
    if out is not None:
        return out
    return Path(tempfile.mkdtemp(prefix=f"ecprune-{name}-quick-")) if quick else committed


def chosen_models(
    args: argparse.Namespace, models: tuple[ModelSpec, ...], quick_models: tuple[ModelSpec, ...]
) -> list[ModelSpec]:
    """The quick models or the full ones, kept to the --models prefixes when given."""
    chosen = quick_models if args.quick else models
    return [m for m in chosen if not args.models or any(m.name.startswith(p) for p in args.models)]
