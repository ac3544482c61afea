"""The oneDNN route of the statistics' products (onednn.py) computes what torch computes."""

from __future__ import annotations

import pytest
import torch

from ecprune_onnx import onednn

requires_onednn = pytest.mark.skipif(
    not onednn.usable(torch.zeros(1)), reason="this torch build has no usable oneDNN kernel"
)


def _mlp(width: int, outputs: int, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),  # smooth: no kink where a 1e-7 difference could flip a gradient
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, outputs),
    )


def _forward(mlp: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every Linear's output z, and the network's output last."""
    found, a = [], x
    for module in mlp:
        a = module(a)
        if isinstance(module, torch.nn.Linear):
            found.append(a)
    return found


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    """Relative Frobenius distance: float32 products summed in another order differ ~1e-7."""
    return bool((actual - expected).norm() <= tolerance * expected.norm())


def _probe_gradients(mlp, x, batched: bool) -> list[torch.Tensor]:
    zs = _forward(mlp, x)
    rows, outputs = zs[-1].shape
    probes = torch.eye(outputs)[:, None, :].expand(outputs, rows, outputs)
    if batched:
        return list(torch.autograd.grad(zs[-1], zs, grad_outputs=probes, is_grads_batched=True))
    per_probe = [
        torch.autograd.grad(zs[-1], zs, grad_outputs=probe, retain_graph=True) for probe in probes
    ]
    return [torch.stack(grads) for grads in zip(*per_probe)]


@requires_onednn
@pytest.mark.parametrize("batched", [False, True])
def test_routed_layers_give_torchs_outputs_and_probe_gradients(batched):
    mlp = _mlp(width=48, outputs=5)
    x = torch.randn(33, 48, requires_grad=True)
    expected_z = _forward(mlp, x)
    expected = _probe_gradients(mlp, x, batched)
    with onednn.routed(mlp):
        assert all(type(m) is not torch.nn.Linear for m in mlp if isinstance(m, torch.nn.Linear))
        got_z = _forward(mlp, x)
        got = _probe_gradients(mlp, x, batched)
    for actual, wanted in zip(got_z, expected_z):
        assert _close(actual.detach(), wanted.detach())
    for actual, wanted in zip(got, expected):
        assert actual.shape == wanted.shape
        assert _close(actual, wanted)


@requires_onednn
def test_a_graph_input_starts_no_gradient_and_a_leaf_that_requires_one_gets_it():
    mlp = _mlp(width=8, outputs=3)
    with onednn.routed(mlp):
        zs = _forward(mlp, torch.randn(4, 8))  # a graph input: no gradient wanted
    assert all(z.is_leaf and not z.requires_grad for z in zs)
    # another layer's output, made a leaf that requires a gradient (gradients_from)
    leaf = torch.randn(4, 8, requires_grad=True)
    with onednn.routed(mlp):
        zs = _forward(mlp, leaf)
    assert not zs[0].is_leaf
    zs[-1].sum().backward()
    assert all(parameter.grad is None for parameter in mlp.parameters())
    assert leaf.grad is not None


@requires_onednn
def test_routing_ends_with_the_block_even_on_an_error():
    mlp = _mlp(width=4, outputs=2)
    with pytest.raises(KeyError), onednn.routed(mlp):
        raise KeyError("boom")
    assert all(type(m) is torch.nn.Linear for m in mlp if isinstance(m, torch.nn.Linear))


@requires_onednn
@pytest.mark.parametrize("bias_shape", [(1, 3), (1,)])  # a Gemm's C as onnx2pytorch keeps it
def test_a_bias_of_another_shape_is_added_as_linear_broadcasts_it(bias_shape):
    layer = torch.nn.Linear(1, 3)
    layer.bias = torch.nn.Parameter(torch.randn(bias_shape))
    x = torch.randn(12, 1)
    expected = layer(x).detach()
    with onednn.routed(layer):
        assert _close(layer(x), expected)


@requires_onednn
def test_transposed_product_is_c_transposed_times_a():
    generator = torch.Generator().manual_seed(1)
    c = torch.rand(300, 17, generator=generator)
    a = torch.randn(300, 29, generator=generator)
    assert _close(onednn.transposed_product(c, a), c.T @ a)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_float64_and_disabled_onednn_take_torchs_own_products():
    c64, a64 = torch.rand(10, 3, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    assert not onednn.usable(a64)
    assert torch.equal(onednn.transposed_product(c64, a64), c64.T @ a64)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn.usable(torch.zeros(1))
        layer = torch.nn.Linear(3, 2)
        with onednn.routed(layer):
            assert type(layer) is torch.nn.Linear
