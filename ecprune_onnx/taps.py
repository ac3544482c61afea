"""A layer's input activations ("taps") read from a model by onnxruntime, and what a pass
keeps of them on disk for a later pass (sequential.py's layer-input passes).

- `TapReader` reads a layer's input, from the graph inputs or from an earlier tap of the
  same model (`TapRecord`): at depth d a session from the graph inputs runs d layers, one
  from the tap before runs what lies between the two.
- `TapRecord` keeps a pass's taps, as onnxruntime gave them, for the next layer's reader.
- `OutputRecord` keeps a layer's outputs W a, for a later pass that would otherwise run the
  original model again up to the layer.

Records live in temporary files (disk, not memory): one [rows, in] array per layer.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import onnx

from ecprune_onnx.instrument import with_outputs
from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.runtime import open_session


class _Batches:
    """Arrays appended to a temporary file and read back in the same order, once."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 (open until read back)
        self.shapes: list[tuple[tuple[int, ...], np.dtype]] = []

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.file.write(memoryview(array).cast("B"))
        self.shapes.append((array.shape, array.dtype))

    def read(self) -> Iterator[np.ndarray]:
        self.file.seek(0)
        for shape, dtype in self.shapes:
            array = np.empty(shape, dtype=dtype)
            self.file.readinto(memoryview(array).cast("B"))
            yield array
        self.file.close()


class TapRecord:
    """The tensor `name` of one model over the calibration batches, as read."""

    def __init__(self, name: str):
        self.name = name
        self.batches = _Batches()

    def value_info(self) -> onnx.ValueInfoProto:
        shape, dtype = self.batches.shapes[0]
        element = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        dims = [f"{self.name}_{axis}" for axis in range(len(shape))]  # batches may differ
        return onnx.helper.make_tensor_value_info(self.name, element, dims)


class TapReader:
    """Reads a layer's input activation as [rows, in] from one model, float32 for float32
    and narrower activations and float64 for float64 (stats._product_dtype's rule).

    `carried`: an earlier tap of the same model (complete), fed to the session in place of
    the nodes that compute it; `keep`: a record that receives this reader's taps; `held`:
    the values of the model's hollow weights (held.py)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layer: DenseLayer,
        carried: TapRecord | None = None,
        keep: TapRecord | None = None,
        held: Mapping[str, np.ndarray] | None = None,
    ):
        self.layer, self.keep = layer, keep
        self.session = None
        self.carried: tuple[str, Iterator[np.ndarray]] | None = None
        graph_inputs = {value.name for value in model.graph.input}
        if carried is not None and carried.name in graph_inputs:
            carried = None  # the feeds hold it
        if carried is not None and carried.name == layer.input_name:
            self.carried = (carried.name, carried.batches.read())  # the tensor itself
        elif layer.input_name not in graph_inputs:
            self.session, self.carried = _session(model, layer.input_name, carried, held)

    def read(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.session is not None:
            if self.carried is not None:
                name, batches = self.carried
                feeds = {**feeds, name: next(batches)}
            tap = self.session.run([self.layer.input_name], feeds)[0]
        elif self.carried is not None:
            tap = next(self.carried[1])
        else:
            tap = feeds[self.layer.input_name]
        if self.keep is not None:
            self.keep.batches.write(tap)
        if self.layer.transpose_input:
            tap = tap.T
        dtype = np.float64 if tap.dtype == np.float64 else np.float32
        return np.asarray(tap, dtype=dtype).reshape(-1, self.layer.in_features)


def _session(model, name, carried, held):
    """A session computing `name`, from `carried` where the nodes it needs read it (and
    none of them writes it), else from the graph inputs alone; and the carried batches."""
    if carried is not None:
        try:
            sliced = with_outputs(model, [name], given={carried.name: carried.value_info()})
        except ValueError:  # a node the tap needs also writes the carried tensor
            sliced = None
        if sliced is not None and carried.name in {value.name for value in sliced.graph.input}:
            session = open_session(sliced, consume=True, held=held)
            return session, (carried.name, carried.batches.read())
    return open_session(with_outputs(model, [name]), consume=True, held=held), None


class OutputRecord:
    """A layer's outputs W a over the calibration batches, in the activations' precision,
    kept between the allocation's pass over the original model, which reads the layer's
    input anyway, and the layer's refit, which then runs only the pruned model up to the
    layer: at 100M weights that saved onnxruntime passes of 3-6 s per layer. Each batch
    keeps a digest of its input, to tell where the pruned model's input is the same bits."""

    def __init__(self, layer: DenseLayer):
        self.weight = ProductWeight(layer.compact_weight)
        self.width = layer.out_features
        self.outputs = _Batches()
        self.digests: list[bytes] = []
        self.input_sum: np.ndarray | None = None  # Σ a, set by the pass that records

    def write(self, a: np.ndarray) -> None:
        self.outputs.write(self.weight.outputs(a))
        self.digests.append(digest(a))

    def read(self) -> Iterator[tuple[np.ndarray, bytes]]:
        return zip(self.outputs.read(), self.digests)


class ProductWeight:
    """A layer's weight for W a products in the activations' precision, cast once."""

    def __init__(self, weight: np.ndarray):
        self.weight = weight
        self.cast: dict[np.dtype, np.ndarray] = {}

    def outputs(self, a: np.ndarray) -> np.ndarray:
        if a.dtype not in self.cast:
            self.cast[a.dtype] = np.asarray(self.weight, dtype=a.dtype).T
        return a @ self.cast[a.dtype]


def digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"), digest_size=16).digest()
