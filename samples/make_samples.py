"""Regenerate the shipped sample model and data deterministically.

Writes three files into ``--out`` (default: the folder of this script):

* ``digits_mlp.onnx``: an MLP 64-128-128-10 (tanh, logits output) trained on
  scikit-learn's bundled 8x8 digits; input ``x`` [batch, 64] float32, output
  ``logits`` [batch, 10]; each dense layer is one ``Gemm`` with initializer weights.
* ``calib.npz``: ``x`` float32 [512, 64] and ``y`` int64 [512], drawn from the training set.
* ``test.npz``: ``x`` float32 [500, 64] and ``y`` int64 [500], the held-out test set.

Inputs are pixels / 16, so in [0, 1]. Running the script twice on the same machine and
library versions gives byte-identical files. The functions can be imported, for example
by a benchmark that wants to train other MLPs on the same split.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_SIZE = 500
CALIB_SIZE = 512
N_FEATURES = 64
N_CLASSES = 10
PRODUCER_NAME = "ecprune_onnx.samples.make_samples"
PRODUCER_VERSION = "1"
ONNX_NAME = "digits_mlp.onnx"
ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


def load_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` of the 8x8 digits.

    ``x`` is float32 [n, 64] in [0, 1], ``y`` int64 [n]. The test set holds
    ``TEST_SIZE`` samples, stratified by class; the split depends only on ``seed``.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def pick_calibration(
    x_train: np.ndarray, y_train: np.ndarray, size: int = CALIB_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` training rows without replacement (kept in training order)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x_train), size=size, replace=False))
    return x_train[idx], y_train[idx]


class MLP(torch.nn.Module):
    """Dense layers ``fc1..fcN`` with an activation between them and none after the last.

    Named attributes (not a ModuleList) give readable ONNX names: ``fc1.weight``,
    ``/fc1/Gemm``, ``/act1/Tanh``.
    """

    def __init__(self, sizes: list[int], activation: str):
        super().__init__()
        self.n_layers = len(sizes) - 1
        for i in range(self.n_layers):
            setattr(self, f"fc{i + 1}", torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < self.n_layers - 1:
                setattr(self, f"act{i + 1}", ACTIVATIONS[activation]())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_layers):
            x = getattr(self, f"act{i}")(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.n_layers}")(x)


@contextlib.contextmanager
def deterministic_torch(seed: int):
    """Seed torch, force deterministic kernels and one thread; restore the globals after.

    One thread matters: a multi-threaded reduction may sum in a different order.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: tuple[int, ...] = (128, 128),
    activation: str = "tanh",
    seed: int = 0,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> MLP:
    """Train an MLP ``64-hidden...-10`` with Adam and cross-entropy; return it in eval mode.

    Minibatches follow a permutation drawn per epoch from a generator seeded with
    ``seed``, so the run is reproducible. The defaults take about a second on one core
    and reach about 97-98 % test accuracy on the digits split.
    """
    sizes = [x.shape[1], *hidden, N_CLASSES]
    with deterministic_torch(seed):
        model = MLP(sizes, activation)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
    return model.eval()


def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def onnx_accuracy(path: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on ``(x, y)``, run by onnxruntime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"x": x})
    return float((logits.argmax(axis=1) == y).mean())


def export_onnx(model: MLP, path: str | Path) -> onnx.ModelProto:
    """Export ``model`` with torch's TorchScript exporter, normalise and check it, save it.

    The exporter stamps the torch version as producer; it is replaced by a stable
    producer and kept as metadata instead. Raises ``ValueError`` if a dense layer did
    not become one ``Gemm`` with initializer weight and bias.
    """
    buf = io.BytesIO()
    example = torch.zeros(1, N_FEATURES)
    with warnings.catch_warnings():
        # dynamo=False is deliberate (plain Gemm graph); silence its deprecation notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name, proto.producer_version = PRODUCER_NAME, PRODUCER_VERSION
    proto.graph.name = Path(path).stem
    onnx.helper.set_model_props(proto, {"torch_version": torch.__version__})
    _check_gemms(proto, model.n_layers)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def _check_gemms(proto: onnx.ModelProto, n_layers: int) -> None:
    """Require exactly ``n_layers`` Gemm nodes whose weight and bias are initializers."""
    inits = {t.name for t in proto.graph.initializer}
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    if len(gemms) != n_layers:
        raise ValueError(f"expected {n_layers} Gemm nodes, the export has {len(gemms)}")
    for node in gemms:
        if len(node.input) != 3 or not set(node.input[1:]) <= inits:
            raise ValueError(f"{node.name}: weight and bias must be initializers")


def write_npz(path: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Save ``x`` (float32) and ``y`` (int64) with ``np.savez``: no pickles, no compression.

    np.savez stamps a fixed zip date, so equal arrays give equal bytes.
    """
    np.savez(path, x=np.ascontiguousarray(x, np.float32), y=np.ascontiguousarray(y, np.int64))


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Train, export and write the samples; print the accuracy and the files' hashes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load_split()
    x_calib, y_calib = pick_calibration(x_train, y_train)
    start = time.perf_counter()
    model = train_mlp(x_train, y_train)
    print(f"trained in {time.perf_counter() - start:.2f} s")

    onnx_path = args.out / ONNX_NAME
    export_onnx(model, onnx_path)
    write_npz(args.out / "calib.npz", x_calib, y_calib)
    write_npz(args.out / "test.npz", x_test, y_test)

    acc_torch = torch_accuracy(model, x_test, y_test)
    acc_onnx = onnx_accuracy(onnx_path, x_test, y_test)
    print(f"test accuracy: onnxruntime {acc_onnx:.4f}, torch {acc_torch:.4f}")
    if acc_onnx != acc_torch:
        raise SystemExit("onnxruntime and torch disagree on the test accuracy")
    for name in (ONNX_NAME, "calib.npz", "test.npz"):
        print(f"{sha256(args.out / name)}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
