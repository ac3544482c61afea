"""Float32 dense products on the CPU through torch's oneDNN kernel, where torch has it.

Why: torch's float32 matmul on the CPU goes to MKL, which on the AMD EPYC of this project's
machines reaches about half the rate of oneDNN, and of onnxruntime's own kernels, on the
very same product (`benchmarks/gemm_rates.py`: 190 against 460 GFLOP/s for a probe
backward's [2560, 3162] × [3162, 3162]). The statistics loop is a few such products per
batch and layer: its forward and probe backward through the dense layers (`routed`) and
the S1/S2 products (`transposed_product`). The kernel is `torch.ops.mkldnn._linear_pointwise`,
an entry point torch's own compiler uses, not a public API: it is used only where a check
on a small product succeeds, for float32 on the CPU with oneDNN enabled at full float32
precision; everywhere else the same products go through torch's matmul.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


@functools.cache
def _kernel_works() -> bool:
    """The kernel exists in this torch build and agrees with matmul on a small product."""
    kernel = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if kernel is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=generator), torch.randn(4, 16, generator=generator)
    try:
        product = kernel(x, w, None, "none", [], "")
    except RuntimeError:  # e.g. a CPU oneDNN does not support
        return False
    return bool(torch.allclose(product, x @ w.T, rtol=1e-5, atol=1e-5))


def usable(tensor: torch.Tensor) -> bool:
    """Whether products of this tensor go through oneDNN: float32 on the CPU, oneDNN enabled
    and at IEEE float32 precision (a bf16 or tf32 setting would round at ~1e-3)."""
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        return False
    if not torch.backends.mkldnn.enabled:
        return False
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if getattr(matmul, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    return _kernel_works()


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x @ weight.T (+ bias [out]) through oneDNN; x of any rank, weight [out, in], any
    strides. A shape the kernel refuses goes through torch's linear: the same product."""
    try:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    except RuntimeError:
        return torch.nn.functional.linear(x, weight, bias)


def transposed_product(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """c.T @ a for c [rows, out] and a [rows, in]: the [out, in] products of the statistics."""
    if usable(a) and c.dtype == a.dtype:
        return _linear_pointwise(c.T, a.T, None)
    return c.T @ a


@contextlib.contextmanager
def routed(module: torch.nn.Module) -> Iterator[None]:
    """Run every float32 `nn.Linear` of `module` on the CPU through oneDNN while inside.

    For the statistics only: gradients reach the layers' outputs and whatever depends on
    them, never the weights, and never a graph input that feeds a layer directly (no
    statistic needs that gradient: this spares the first layer's input gradient, which
    torch's own backward also skips when asked only for the outputs; the layer's output
    becomes a leaf that requires a gradient through `TorchGraph.gradients_from`). Other
    modules and devices are left as they are.
    """
    swapped = [
        child
        for child in module.modules()
        if type(child) is torch.nn.Linear and usable(child.weight)
    ]
    for child in swapped:
        child.__class__ = _RoutedLinear
    try:
        yield
    finally:
        for child in swapped:
            child.__class__ = torch.nn.Linear


class _RoutedLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        if bias is not None and bias.numel() == weight.shape[0]:
            bias = bias.reshape(-1)  # onnx2pytorch keeps a Gemm's [1, out] bias as it is
        if not usable(x) or (bias is not None and bias.shape != weight.shape[:1]):
            # a bias that broadcasts (Gemm's C of shape [1]): linear does it
            return torch.nn.functional.linear(x, weight, bias)
        if not (x.requires_grad and torch.is_grad_enabled()):
            # a graph input, or no autograd at all: no gradient wanted. A leaf that requires
            # a gradient is another layer's output z, feeding this one directly (a PCA
            # MatMul, a no-op Cast, then an MLP's first MatMul): its gradient is wanted.
            with torch.no_grad():
                return _linear_pointwise(x, weight, bias)
        return _Linear.apply(x, weight, bias)


class _Linear(torch.autograd.Function):
    """x @ W.T + b with the gradient of x only (W and b come detached). A batched backward
    (`is_grads_batched`) runs the kernel once per probe vector, through vmap's generic
    fallback: one product over all probes' rows measured no faster (425–443 against
    415–436 GFLOP/s for 10 probes × 256 rows, widths 2048–7000)."""

    @staticmethod
    def forward(x, weight, bias):
        return _linear_pointwise(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _linear_pointwise(grad, weight.T, None), None, None
