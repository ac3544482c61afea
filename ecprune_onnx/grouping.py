"""Statistics larger than memory: S1 and S2 of groups of layers, one pass of the calibration
data per group, kept on disk until the masks are chosen (docs/design.md, "Models larger than
memory").

S1 and S2 are 16 bytes per weight in float64 (24 with the loss gradient of `gradient`), for
every layer at once in a single pass. When that is more than the memory given (`--max-memory`,
default half the memory available), the layers are split, in graph order, into groups whose
sums fit; each group gets one pass (`stats.collect_stats(products_for=group)`), and its sums
go to memory-mapped files before the next pass. Every pass draws the same probes from the
seed and sums the same batches in the same order, so each layer's sums, and so the written
model, are those of one pass (tests/test_grouping.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.stats import LayerStats

GIB = 1024**3


@dataclass(frozen=True)
class StatsPlan:
    """The groups of layers summed in one pass each, and the sizes that decided them."""

    groups: list[list[DenseLayer]]
    total_bytes: int  # the [out, in] sums of all layers
    budget_bytes: int

    @property
    def passes(self) -> int:
        return len(self.groups)

    def note(self, limit_source: str) -> str:
        largest = max(sum(_sum_bytes(layer, 2) for layer in group) for group in self.groups)
        return (
            f"statistics in {self.passes} passes over the calibration data, one per group of "
            f"layers: the S1/S2 sums of all layers take {self.total_bytes / GIB:.2f} GiB, more "
            f"than {limit_source} ({self.budget_bytes / GIB:.2f} GiB); the largest group's "
            f"{largest / GIB:.2f} GiB, each group's kept on disk until the masks are chosen"
        )


def _sum_bytes(layer: DenseLayer, matrices: int) -> int:
    """Bytes of `matrices` float64 [out, in] sums of one layer."""
    out_features, in_features = layer.shape
    return 8 * matrices * out_features * in_features


def plan_groups(layers: list[DenseLayer], budget_bytes: int, with_gradient: bool) -> StatsPlan:
    """Consecutive layers, as many per group as fit the budget; a layer larger than the budget
    on its own is a group of its own (its sums are needed whole)."""
    matrices = 3 if with_gradient else 2
    groups: list[list[DenseLayer]] = []
    used = budget_bytes + 1  # start a first group
    for layer in layers:
        size = _sum_bytes(layer, matrices)
        if used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += size
    total = sum(_sum_bytes(layer, matrices) for layer in layers)
    return StatsPlan(groups, total, budget_bytes)


def collect_in_groups(
    plan: StatsPlan, collect: Callable[[Iterable[str]], dict[str, LayerStats]]
) -> dict[str, LayerStats]:
    """`collect(names)` once per group (S1/S2 of those layers, S0 of all); each group's
    [out, in] sums move to disk before the next pass. Returns every layer's statistics."""
    stats: dict[str, LayerStats] = {}
    for group in plan.groups:
        names = [layer.name for layer in group]
        found = collect(names)
        for name in names:
            stats[name] = _on_disk(found[name])
        del found
    return stats


def _on_disk(layer_stats: LayerStats) -> LayerStats:
    """The same statistics with S1, S2 (and the loss gradient) in memory-mapped files."""
    return replace(
        layer_stats,
        s1=_mapped_copy(layer_stats.s1),
        s2=_mapped_copy(layer_stats.s2),
        loss_grad=_mapped_copy(layer_stats.loss_grad),
    )


def _mapped_copy(array: np.ndarray | None) -> np.ndarray | None:
    """A copy of `array` in a temporary file that is unlinked at once: the mapping keeps the
    data until the array is dropped, and nothing is left behind, even after a crash. Its
    pages are the kernel's to write out and read back, not the process's memory."""
    if array is None:
        return None
    handle, path = tempfile.mkstemp(prefix="ecprune-stats-", suffix=".f64")
    try:
        try:
            if hasattr(os, "posix_fallocate"):  # a full disk: ENOSPC here, not SIGBUS later
                os.posix_fallocate(handle, 0, max(array.nbytes, 1))
        finally:
            os.close(handle)
        mapped = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    finally:
        os.unlink(path)
    mapped[...] = array
    return mapped
