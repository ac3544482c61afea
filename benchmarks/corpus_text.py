"""Text shipped with Python, cut into training and held-out samples for the corpus models.

Nothing is downloaded: the prose is pydoc's topic help (`pydoc_data.topics`, about 460 k
characters on CPython 3.11) and the code is a fixed list of stdlib modules. Both change
between Python releases, so the samples are reproducible on one interpreter, not across
them; models trained on them are cached (state_dict, or the committed tf2onnx fixture).

Only numpy and the stdlib are imported: the tf2onnx fixture's generator runs this module in
a TensorFlow venv that has neither torch nor the project.
"""

from __future__ import annotations

import inspect

import numpy as np

# Modules whose source is plain Python text; any stdlib module that ships as .py works.
CODE_MODULES = ("argparse", "textwrap", "json.decoder", "csv", "difflib", "calendar", "shlex")


def prose_text() -> str:
    """pydoc's help topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def code_text() -> str:
    """Python source of CODE_MODULES."""
    import importlib

    return "\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)


def split_text(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """(training, held-out): the held-out part is the tail, so no window straddles both."""
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def windows(codes: np.ndarray, rows: int, length: int, seed: int) -> np.ndarray:
    """`rows` random windows of `length` consecutive entries of `codes`, int64 [rows, length]."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(codes) - length, size=rows)
    return np.stack([codes[start : start + length] for start in starts]).astype(np.int64)


def utf8_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def byte_snippets(rows: int, length: int, seed: int, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte windows of prose (label 0) and Python code (label 1), shuffled.

    part: "train" (the first 90% of each text) or "test" (the last 10%).
    """
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    which = 0 if part == "train" else 1
    prose = utf8_bytes(split_text(prose_text())[which])
    code = utf8_bytes(split_text(code_text())[which])
    half = rows // 2
    prose_rows = windows(prose, half, length, seed)
    code_rows = windows(code, rows - half, length, seed + 1)
    x = np.concatenate([prose_rows, code_rows])
    y = np.concatenate([np.zeros(half, np.int64), np.ones(rows - half, np.int64)])
    order = np.random.default_rng(seed + 2).permutation(rows)
    return x[order], y[order]
