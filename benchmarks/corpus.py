"""Build a corpus of models from real exporters, with calibration and test data (issue #14).

    python benchmarks/corpus.py --out DIR [--only NAME,...] [--quick] [--with-tf PYTHON]

Each model is DIR/NAME.onnx (plus the external data its exporter wrote), DIR/NAME.calib.npz
and DIR/NAME.test.npz (arrays named after the graph's inputs: int64 token ids where the
model takes ids, attention masks with realistic right padding; labels in the test file of
a trained model), and its manifest entry DIR/entries/NAME.json; DIR/manifest.json lists
them all. A model whose .onnx exists is not rebuilt (delete it to rebuild); an exporter
that cannot export a model leaves an entry with `error` and no file.

The models (random weights from each config's own init unless `trained`):
  transformers BERT (sequence classification), DistilBERT (base model), GPT-2 (LM head),
    ViT (image classification) and Whisper (audio classification: the encoder and a
    pooled head), each through torch.onnx.export(dynamo=True) and the TorchScript
    exporter (dynamo=False); SDPA attention first, eager where SDPA fails an exporter.
  a character-level causal transformer trained here on pydoc's help text, and a small
    ViT trained on sklearn's 8x8 digits, through both torch exporters.
  skl2onnx: StandardScaler + PCA + MLPClassifier on sklearn's digits.
  tf2onnx: a byte-level prose/code classifier (benchmarks/corpus_fixtures/), copied from
    the committed fixture, or regenerated with --with-tf PYTHON (a venv with TensorFlow).

Nothing is downloaded: configs only, data bundled with scikit-learn or shipped with Python.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import corpus_text  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "corpus_models"
FIXTURES = ROOT / "benchmarks" / "corpus_fixtures"
TF_FIXTURE = "tf_byte_classifier"

SEQ = 16  # tokens per row of the transformers models
CALIB_ROWS = 256
TEST_ROWS = 128
QUICK_ROWS = 32
# --quick: one model per exporter family, the cheapest ones.
QUICK_MODELS = ("bert_dynamo", "gpt2_torchscript", "sklearn_digits_mlp", "tf2onnx_byte_classifier")
DYNAMO_OPSET = 18  # torch 2.14's dynamo exporter writes opset 18 by default
TORCHSCRIPT_OPSET = 17
EXPORTERS = ("dynamo", "torchscript")


@dataclass
class Entry:
    """One corpus model, as manifest.json records it."""

    name: str
    family: str
    exporter: str  # the exporter and its version, e.g. "torch 2.14.1 dynamo (opset 18)"
    file: str | None  # relative to the corpus directory; None when the export failed
    data_files: list[str]  # external data written beside the file
    inputs: list[dict]  # name, dtype, shape (str for a symbolic dimension)
    outputs: list[str]
    y: str | None  # the output that counts as the model's prediction
    task: str  # what y is: "classification", "lm", "features", ...
    labels: str | None  # the labels array of the test file (trained models only)
    trained: bool
    calib: str | None
    test: str | None
    size_bytes: int = 0
    build_seconds: float = 0.0
    export_max_rel_dev: float | None = None  # onnxruntime vs the source framework
    attn_implementation: str | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class TorchSource:
    """A torch model to export, with the data that feeds it."""

    family: str
    module: nn.Module  # takes the inputs positionally, returns a tuple of `outputs`
    inputs: list[str]
    outputs: list[str]
    y: str
    task: str
    calib: dict[str, np.ndarray]
    test: dict[str, np.ndarray]  # inputs, plus `labels` for a trained model
    trained: bool = False
    attn_implementation: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The whole module in eval mode, wrapper included: torch 2.14's TorchScript exporter
        # exports in eval mode but then restores the *outer* module's mode recursively, so
        # a wrapper left in training mode switches the transformers model's dropout on.
        self.module.eval()


# ------------------------------------------------------------------------- data


def token_ids(rows: int, vocab: int, seed: int, first_id: int = 1) -> np.ndarray:
    """Random ids (id 0 is kept for padding), int64 [rows, SEQ]."""
    return np.random.default_rng(seed).integers(first_id, vocab, size=(rows, SEQ), dtype=np.int64)


def padded_mask(rows: int, seed: int) -> np.ndarray:
    """Right padding like a tokenizer's batch: each row keeps 4..SEQ tokens, int64 [rows, SEQ]."""
    lengths = np.random.default_rng(seed).integers(4, SEQ + 1, size=rows)
    return (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)


def text_batch(rows: int, vocab: int, seed: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    mask = padded_mask(rows, seed + 1)
    ids = np.where(mask == 1, token_ids(rows, vocab, seed), pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def gaussian(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------- transformers


class SelectOutputs(nn.Module):
    """Positional inputs in, a tuple of named outputs out: a transformers model returns a
    ModelOutput, and both exporters want the graph's inputs and outputs spelled out."""

    def __init__(self, model: nn.Module, inputs: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = inputs
        self.output_names = outputs

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.input_names, args)), return_dict=True)
        return tuple(result[name] for name in self.output_names)


def hf_model(config_class: str, model_class: str, attn: str, seed: int, **config) -> nn.Module:
    import transformers

    torch.manual_seed(seed)  # distinct random weights per family, from the config's init
    config = getattr(transformers, config_class)(**config, attn_implementation=attn)
    return getattr(transformers, model_class)(config).eval()


def bert(attn: str, rows: tuple[int, int]) -> TorchSource:
    vocab = 1000
    model = hf_model(
        "BertConfig", "BertForSequenceClassification", attn, seed=1,
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    inputs = ["input_ids", "attention_mask"]
    return TorchSource(
        "bert", SelectOutputs(model, inputs, ["logits"]), inputs, ["logits"], "logits",
        "classification (3 classes, untrained)",
        text_batch(rows[0], vocab, seed=10), text_batch(rows[1], vocab, seed=20),
    )  # fmt: skip


def distilbert(attn: str, rows: tuple[int, int]) -> TorchSource:
    vocab = 1000
    model = hf_model(
        "DistilBertConfig", "DistilBertModel", attn, seed=2,
        vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
        max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    inputs = ["input_ids", "attention_mask"]
    outputs = ["last_hidden_state"]
    return TorchSource(
        "distilbert", SelectOutputs(model, inputs, outputs), inputs, outputs,
        "last_hidden_state", "features (untrained)",
        text_batch(rows[0], vocab, seed=11), text_batch(rows[1], vocab, seed=21),
    )  # fmt: skip


def gpt2(attn: str, rows: tuple[int, int]) -> TorchSource:
    vocab = 500
    model = hf_model(
        "GPT2Config", "GPT2LMHeadModel", attn, seed=3,
        vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=vocab - 1, eos_token_id=vocab - 1, use_cache=False,
    )  # fmt: skip
    # A causal LM scored on full windows, so the mask is all ones. It is an input anyway:
    # without it transformers 5.25 looks for packed sequences in the position ids
    # (masking_utils.find_packed_sequence_indices, torch.diff), and the TorchScript
    # exporter of torch 2.14 fails: "Exporting the operator 'aten::diff' to ONNX opset
    # version 17 is not supported" (SDPA and eager alike).
    inputs = ["input_ids", "attention_mask"]

    def full_windows(count: int, seed: int) -> dict[str, np.ndarray]:
        ids = token_ids(count, vocab, seed)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    return TorchSource(
        "gpt2", SelectOutputs(model, inputs, ["logits"]), inputs, ["logits"], "logits",
        "lm (untrained)", full_windows(rows[0], seed=12), full_windows(rows[1], seed=22),
    )  # fmt: skip


def vit(attn: str, rows: tuple[int, int]) -> TorchSource:
    model = hf_model(
        "ViTConfig", "ViTForImageClassification", attn, seed=4,
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=5,
    )  # fmt: skip
    inputs = ["pixel_values"]
    return TorchSource(
        "vit", SelectOutputs(model, inputs, ["logits"]), inputs, ["logits"], "logits",
        "classification (5 classes, untrained)",
        {"pixel_values": gaussian((rows[0], 3, 32, 32), seed=13)},
        {"pixel_values": gaussian((rows[1], 3, 32, 32), seed=23)},
    )  # fmt: skip


def whisper(attn: str, rows: tuple[int, int]) -> TorchSource:
    # WhisperForAudioClassification: Whisper's encoder (conv front end, transformer layers)
    # and a mean-pooled projection + classifier. The encoder insists on exactly
    # 2 * max_source_positions frames of input_features.
    vocab = 100
    model = hf_model(
        "WhisperConfig", "WhisperForAudioClassification", attn, seed=5,
        vocab_size=vocab, num_mel_bins=16, d_model=64, encoder_layers=2,
        encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=128, max_source_positions=16,
        max_target_positions=16, num_labels=4, classifier_proj_size=32,
        pad_token_id=vocab - 1, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        decoder_start_token_id=vocab - 2,
    )  # fmt: skip
    inputs = ["input_features"]
    return TorchSource(
        "whisper", SelectOutputs(model, inputs, ["logits"]), inputs, ["logits"], "logits",
        "classification (4 classes, untrained)",
        {"input_features": gaussian((rows[0], 16, 32), seed=14)},
        {"input_features": gaussian((rows[1], 16, 32), seed=24)},
    )  # fmt: skip


HF_FAMILIES: dict[str, Callable[[str, tuple[int, int]], TorchSource]] = {
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "vit": vit,
    "whisper": whisper,
}

# ------------------------------------------------------------------------- trained models


class Block(nn.Module):
    """Pre-norm transformer block written with nn.Linear only (no nn.MultiheadAttention,
    whose fused fast path exports to ops other than MatMul/Gemm)."""

    def __init__(self, dim: int, heads: int, seq: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        allowed = torch.ones(seq, seq, dtype=torch.bool)
        self.register_buffer("allowed", torch.tril(allowed) if causal else allowed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        q, k, v = (t.reshape(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (dim // self.heads) ** 0.5
        scores = scores.masked_fill(~self.allowed[:seq, :seq], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    def __init__(self, vocab: int, seq: int, dim: int = 64, heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(1, seq, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, seq, causal=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]
        return (self.head(self.norm(self.blocks(x))),)


class DigitsViT(nn.Module):
    """8x8 digits cut into 16 patches of 2x2 pixels, embedded by a Linear."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, 16, causal=False) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        batch = pixel_values.shape[0]
        patches = pixel_values.reshape(batch, 4, 2, 4, 2).permute(0, 1, 3, 2, 4)
        x = self.patch(patches.reshape(batch, 16, 4)) + self.position
        return (self.head(self.norm(self.blocks(x)).mean(1)),)


CHAR_SEQ = 32
CHAR_STEPS = 1500
DIGITS_EPOCHS = 40


def train_steps(model: nn.Module, batches: Callable[[int], tuple], steps: int, lr: float) -> None:
    """AdamW with a fixed number of steps: the same weights on every run of one machine."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        x, y = batches(step)
        logits = model(x)[0]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def trained(model: nn.Module, weights: Path, train: Callable[[nn.Module], None]) -> list[str]:
    """Load the cached state_dict, or train (seeded, deterministic) and cache it."""
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        return [f"weights loaded from {weights.name}"]
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    try:
        train(model)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    torch.save(model.state_dict(), weights)
    return [f"trained in {time.perf_counter() - started:.0f} s, cached as {weights.name}"]


def char_lm(out: Path, rows: tuple[int, int]) -> TorchSource:
    train_text, test_text = corpus_text.split_text(corpus_text.prose_text())
    alphabet = sorted(set(train_text + test_text))
    index = {char: i for i, char in enumerate(alphabet)}
    train_codes = np.array([index[c] for c in train_text], dtype=np.int64)
    test_codes = np.array([index[c] for c in test_text], dtype=np.int64)

    def next_char_rows(codes: np.ndarray, count: int, seed: int) -> dict[str, np.ndarray]:
        window = corpus_text.windows(codes, count, CHAR_SEQ + 1, seed)
        return {"input_ids": window[:, :-1], "labels": window[:, 1:]}

    def train(model: nn.Module) -> None:
        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows_ = next_char_rows(train_codes, 32, seed=1000 + step)
            return torch.from_numpy(rows_["input_ids"]), torch.from_numpy(rows_["labels"])

        train_steps(model, batches, CHAR_STEPS, lr=3e-3)

    torch.manual_seed(6)
    model = CharLM(len(alphabet), CHAR_SEQ)
    notes = trained(model, out / "char_lm.pt", train)
    calib = next_char_rows(train_codes, rows[0], seed=16)
    calib.pop("labels")
    return TorchSource(
        "char_lm", model, ["input_ids"], ["logits"], "logits",
        f"lm: next character of pydoc's help text ({len(alphabet)} characters), trained",
        calib, next_char_rows(test_codes, rows[1], seed=26), trained=True, notes=notes,
    )  # fmt: skip


def digits_vit(out: Path, rows: tuple[int, int]) -> TorchSource:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels.astype(np.int64), test_size=0.2, random_state=0, stratify=labels
    )

    def train(model: nn.Module) -> None:
        per_epoch = len(x_train) // 64
        order = np.concatenate(
            [
                np.random.default_rng(epoch).permutation(len(x_train))
                for epoch in range(DIGITS_EPOCHS)
            ]
        )

        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            picked = order[step * 64 : (step + 1) * 64]
            return torch.from_numpy(x_train[picked]), torch.from_numpy(y_train[picked])

        train_steps(model, batches, DIGITS_EPOCHS * per_epoch, lr=2e-3)

    torch.manual_seed(7)
    model = DigitsViT()
    notes = trained(model, out / "digits_vit.pt", train)
    return TorchSource(
        "digits_vit", model, ["pixel_values"], ["logits"], "logits",
        "classification: sklearn digits 8x8 (10 classes), trained",
        {"pixel_values": x_train[: rows[0]]},
        {"pixel_values": x_test[: rows[1]], "labels": y_test[: rows[1]]},
        trained=True, notes=notes,
    )  # fmt: skip


TRAINED_FAMILIES: dict[str, Callable[[Path, tuple[int, int]], TorchSource]] = {
    "char_lm": char_lm,
    "digits_vit": digits_vit,
}

# ------------------------------------------------------------------------- torch exporters


def export_torch(source: TorchSource, exporter: str, path: Path) -> None:
    """Export with dynamic batch (the first dimension of every input and output)."""
    example = tuple(torch.from_numpy(source.calib[name][:2]) for name in source.inputs)
    quiet = contextlib.redirect_stdout(io.StringIO())  # the dynamo exporter's progress lines
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            # Mapped by tensor, not by position: SelectOutputs takes *args, which
            # torch.export sees as one parameter holding a tuple.
            shapes = torch.export.ShapesCollection()
            batch = torch.export.Dim("batch")
            for tensor in example:
                shapes[tensor] = {0: batch}
            torch.onnx.export(
                source.module, example, str(path), dynamo=True, opset_version=DYNAMO_OPSET,
                input_names=source.inputs, output_names=source.outputs,
                dynamic_shapes=shapes.dynamic_shapes(source.module, example),
            )  # fmt: skip
        else:
            dynamic = {name: {0: "batch"} for name in [*source.inputs, *source.outputs]}
            torch.onnx.export(
                source.module, example, str(path), dynamo=False,
                opset_version=TORCHSCRIPT_OPSET, input_names=source.inputs,
                output_names=source.outputs, dynamic_axes=dynamic,
            )  # fmt: skip


def exporter_label(exporter: str) -> str:
    opset = DYNAMO_OPSET if exporter == "dynamo" else TORCHSCRIPT_OPSET
    return f"torch {torch.__version__} {exporter} (opset {opset})"


def torch_reference(source: TorchSource, rows: int = 32) -> list[np.ndarray]:
    feeds = tuple(torch.from_numpy(source.calib[name][:rows]) for name in source.inputs)
    with torch.no_grad():
        return [tensor.numpy() for tensor in source.module(*feeds)]


def build_torch_model(out: Path, name: str, make: Callable[[str], TorchSource], exporter: str):
    """Export the model SDPA-first; where SDPA fails this exporter, again with eager."""
    path = out / f"{name}.onnx"
    notes: list[str] = []
    error = None
    for attn in ("sdpa", "eager"):
        source = make(attn)
        try:
            export_torch(source, exporter, path)
            break
        except Exception as caught:  # any exporter failure is a finding, recorded as is
            error = f"{type(caught).__name__}: {first_lines(str(caught))}"
            notes.append(f"attn_implementation={attn}: export failed: {error}")
            if not name.startswith(tuple(HF_FAMILIES)):
                break  # our own modules have no attention implementation to switch
    else:
        source = None
    if path.exists():
        error = None
    return source, notes, error


def first_lines(text: str, limit: int = 600) -> str:
    """One line: ANSI colours and torch.export's boilerplate advice removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text[:limit] + (" ..." if len(text) > limit else "")


# ------------------------------------------------------------------------- other exporters


def sklearn_digits_mlp(out: Path, rows: tuple[int, int]) -> Entry:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int64), test_size=0.2, random_state=0, stratify=y
    )
    classifier = MLPClassifier((128, 64), max_iter=300, random_state=0)
    pipeline = make_pipeline(StandardScaler(), PCA(32, random_state=0), classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.fit(x_train, y_train)
    model = to_onnx(
        pipeline, x_train[:1], options={id(classifier): {"zipmap": False}}, target_opset=17
    )
    name = "sklearn_digits_mlp"
    onnx.save(model, out / f"{name}.onnx")
    input_name = model.graph.input[0].name
    np.savez(out / f"{name}.calib.npz", **{input_name: x_train[: rows[0]]})
    np.savez(
        out / f"{name}.test.npz", **{input_name: x_test[: rows[1]], "labels": y_test[: rows[1]]}
    )
    return Entry(
        name, "sklearn_digits_mlp", f"skl2onnx {metadata.version('skl2onnx')} (opset 17)",
        f"{name}.onnx", [], [], [], "probabilities",
        "classification: sklearn digits (10 classes), trained", "labels", True,
        f"{name}.calib.npz", f"{name}.test.npz",
        notes=[f"scikit-learn test accuracy {pipeline.score(x_test, y_test):.3f}"],
    )  # fmt: skip


def tf2onnx_byte_classifier(out: Path, rows: tuple[int, int], tf_python: str | None) -> Entry:
    """The committed fixture, or a fresh export when a TensorFlow venv is given."""
    name = "tf2onnx_byte_classifier"
    if tf_python:
        source = Path(tempfile.mkdtemp(prefix="tf2onnx_"))
        generator = FIXTURES / "make_tf_byte_model.py"
        subprocess.run([tf_python, str(generator), str(source)], check=True, cwd=ROOT)
        origin = f"regenerated with {tf_python}"
    else:
        source = FIXTURES / TF_FIXTURE
        origin = "copied from benchmarks/corpus_fixtures/tf_byte_classifier/"
    shutil.copyfile(source / f"{TF_FIXTURE}.onnx", out / f"{name}.onnx")
    for part, count in (("calib", rows[0]), ("test", rows[1])):
        with np.load(source / f"{part}.npz") as arrays:
            np.savez(out / f"{name}.{part}.npz", **{key: arrays[key][:count] for key in arrays})
    return Entry(
        name, "tf_byte_classifier", "tensorflow-cpu 2.21.0 + tf2onnx 1.17.0 (opset 17)",
        f"{name}.onnx", [], [], [], "logits",
        "classification: prose vs Python source, bytes (2 classes), trained", "labels", True,
        f"{name}.calib.npz", f"{name}.test.npz",
        notes=[origin, "dense1 bias [1,1,64] (jax2tf style), dense2 bias [64] (Keras style)"],
    )  # fmt: skip


# ------------------------------------------------------------------------- manifest


def describe_graph(entry: Entry, out: Path) -> Entry:
    """Fill inputs, outputs, size and external data from the written file."""
    path = out / entry.file
    model = onnx.load(str(path), load_external_data=False)
    initialized = {tensor.name for tensor in model.graph.initializer}
    entry.inputs = [
        {
            "name": value.name,
            "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)),
            "shape": [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim],
        }
        for value in model.graph.input
        if value.name not in initialized
    ]
    entry.outputs = [value.name for value in model.graph.output]
    entry.data_files = sorted(
        {
            item.value
            for tensor in model.graph.initializer
            for item in tensor.external_data
            if item.key == "location"
        }
    )
    entry.size_bytes = path.stat().st_size + sum(
        (out / name).stat().st_size for name in entry.data_files
    )
    return entry


def onnxruntime_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {value.name for value in session.get_inputs()}
    return session.run(None, {name: array for name, array in feeds.items() if name in wanted})


def max_rel_dev(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """max over outputs of max|candidate - reference| / max|reference|."""
    return max(
        float(np.max(np.abs(c.astype(np.float64) - r)) / max(float(np.max(np.abs(r))), 1e-30))
        for r, c in zip(reference, candidate)
    )


def torch_entry(out: Path, name: str, exporter: str, make: Callable[[str], TorchSource]) -> Entry:
    source, notes, error = build_torch_model(out, name, make, exporter)
    if source is None:
        return Entry(
            name, name.rsplit("_", 1)[0], exporter_label(exporter), None, [], [], [], None,
            "", None, False, None, None, notes=notes, error=error,
        )  # fmt: skip
    np.savez(out / f"{name}.calib.npz", **source.calib)
    np.savez(out / f"{name}.test.npz", **source.test)
    attn = getattr(getattr(source.module, "model", None), "config", None)
    entry = Entry(
        name, source.family, exporter_label(exporter), f"{name}.onnx", [], [], [], source.y,
        source.task, "labels" if "labels" in source.test else None, source.trained,
        f"{name}.calib.npz", f"{name}.test.npz",
        attn_implementation=attn._attn_implementation if attn is not None else None,
        notes=[*notes, *source.notes],
    )  # fmt: skip
    reference = torch_reference(source)
    exported = onnxruntime_outputs(out / entry.file, {k: v[:32] for k, v in source.calib.items()})
    entry.export_max_rel_dev = max_rel_dev(reference, exported)
    return entry


def model_builders(out: Path, rows: tuple[int, int], tf_python: str | None):
    """name -> a function that writes the model and returns its entry."""
    builders: dict[str, Callable[[], Entry]] = {}
    for family, make in HF_FAMILIES.items():
        for exporter in EXPORTERS:
            name = f"{family}_{exporter}"
            builders[name] = lambda n=name, e=exporter, m=make: torch_entry(
                out, n, e, lambda attn: m(attn, rows)
            )
    for family, make in TRAINED_FAMILIES.items():
        for exporter in EXPORTERS:
            name = f"{family}_{exporter}"
            builders[name] = lambda n=name, e=exporter, m=make: torch_entry(
                out, n, e, lambda _attn: m(out, rows)
            )
    builders["sklearn_digits_mlp"] = lambda: sklearn_digits_mlp(out, rows)
    builders["tf2onnx_byte_classifier"] = lambda: tf2onnx_byte_classifier(out, rows, tf_python)
    return builders


def build(out: Path, only: list[str] | None, quick: bool, tf_python: str | None) -> list[Entry]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "entries").mkdir(exist_ok=True)
    rows = (QUICK_ROWS, QUICK_ROWS) if quick else (CALIB_ROWS, TEST_ROWS)
    builders = model_builders(out, rows, tf_python)
    names = only or (list(QUICK_MODELS) if quick else list(builders))
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(builders)}")
    for name in names:
        entry_path = out / "entries" / f"{name}.json"
        if (out / f"{name}.onnx").exists() and entry_path.exists():
            print(f"{name}: cached")
            continue
        started = time.perf_counter()
        entry = builders[name]()
        if entry.file is not None:
            describe_graph(entry, out)
        entry.build_seconds = round(time.perf_counter() - started, 2)
        entry_path.write_text(json.dumps(asdict(entry), indent=1) + "\n")
        status = f"FAILED {entry.error}" if entry.error else f"{entry.size_bytes / 1024:.0f} KiB"
        print(f"{name}: {status} ({entry.build_seconds:.1f} s)", flush=True)
    return write_manifest(out)


def write_manifest(out: Path) -> list[Entry]:
    """manifest.json: every entry in the directory, built now or earlier."""
    entries = [Entry(**json.loads(p.read_text())) for p in sorted((out / "entries").glob("*.json"))]
    (out / "manifest.json").write_text(json.dumps([asdict(e) for e in entries], indent=1) + "\n")
    return entries


def load_manifest(out: Path) -> list[Entry]:
    return [Entry(**item) for item in json.loads((out / "manifest.json").read_text())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows; few models")
    parser.add_argument("--with-tf", metavar="PYTHON", help="regenerate the tf2onnx model")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    entries = build(args.out, only, args.quick, args.with_tf)
    print(f"manifest: {args.out / 'manifest.json'} ({len(entries)} models)")


if __name__ == "__main__":
    main()
