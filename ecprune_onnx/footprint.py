"""How many bytes a model file takes on disk, and after a standard compressor.

gzip (stdlib, level 9) stands for what a download or an artefact store pays: quantized
codes and pruned zeros compress, float32 mantissas hardly do, so the compressed size is
where pruning and quantization add up.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from ecprune_onnx.modelio import external_data_files

# Bytes read and fed to the compressor at a time: a large model is never held whole.
_CHUNK = 1 << 24


@dataclass(frozen=True)
class FileSizes:
    """The .onnx file plus its external data files: raw bytes and gzip -9 bytes."""

    raw: int
    gzip: int


def file_sizes(path: str | os.PathLike) -> FileSizes:
    """Raw and gzip-compressed bytes of the model at `path` with its external data, the
    files compressed one after the other as one stream (as a tar.gz of them would be)."""
    files = [Path(path), *external_data_files(path)]
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip format
    raw = packed = 0
    for file in files:
        if not file.is_file():
            continue
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                raw += len(chunk)
                packed += len(compressor.compress(chunk))
    packed += len(compressor.flush())
    return FileSizes(raw=raw, gzip=packed)
