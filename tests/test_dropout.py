"""speed.dropout=fast: air-reg's counter-based dropout kernel and the torch fallback beside it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel

from air_reg.speed import dropout, kernels
from air_reg.speed.dropout import FastDropout


@pytest.fixture(params=["kernel", "torch"])
def masks(request, monkeypatch):
    """Run a test with the C++ kernel's masks, then with the torch fallback's."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("no C++ compiler here: the kernel cannot be built")
    if request.param == "torch":
        monkeypatch.setattr(dropout, "uses_kernel", lambda x: False)
    return request.param


def test_fast_dropout_has_dropouts_distribution_and_gradient(masks):
    drop = FastDropout(0.3).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()  # a broadcast gradient (stride 0)
    assert torch.equal(x.grad, y.detach())  # d(x * mask * s)/dx = mask * s
    assert torch.equal(drop.eval()(x), x)


def test_fast_dropout_masks_are_fair_at_every_position_and_any_shape(masks):
    torch.manual_seed(0)
    y = FastDropout(0.5).train()(torch.ones(100_000, 4))  # torch: column c = int16 lane c
    rates = (y != 0).float().mean(0)
    assert torch.allclose(rates, torch.full((4,), 0.5), atol=0.01), rates
    assert FastDropout(0.5).train()(torch.ones(3, 5, 7)).shape == (3, 5, 7)  # 105: not 4k


def test_fused_relu_dropout_is_the_relu_then_the_same_mask(masks):
    drop, fused_drop = FastDropout(0.5).train(), FastDropout(0.5, relu=True).train()
    x = torch.randn(64, 49, 64)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    fused = fused_drop(leaf)
    torch.manual_seed(1)
    ref = F.relu(drop(ref_leaf))  # relu(mask * x * s) = mask * relu(x) * s
    assert torch.equal(fused, ref)
    grad = torch.randn(64, 64, 49).transpose(1, 2)  # a non-contiguous gradient
    fused.backward(grad)
    ref.backward(grad)
    assert torch.equal(leaf.grad, ref_leaf.grad)


def test_gradient_of_a_transposed_view_follows_the_element_order(masks):
    drop = FastDropout(0.5).train()
    x = torch.randn(300, 200).t().requires_grad_()  # non-contiguous input
    y = drop(x)
    grad = torch.randn(200, 300)
    y.backward(grad)
    assert torch.equal(x.grad, grad * (y != 0) * 2)


def splitmix64_keep(seed: int, n: int, drop: int) -> torch.Tensor:
    """The mask csrc/dropout.cpp documents, in Python integers: element i keeps when bits
    16 (i % 4) .. + 15 of SplitMix64(seed + (i // 4 + 1) * gamma) are >= drop."""
    full, keep = 2**64 - 1, []
    for i in range(n):
        z = (seed + (i // 4 + 1) * 0x9E3779B97F4A7C15) & full
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & full
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & full
        z ^= z >> 31
        keep.append((z >> (16 * (i % 4))) & 0xFFFF >= drop)
    return torch.tensor(keep)


@needs_kernel
def test_kernel_mask_is_splitmix64_of_seed_and_index_across_shares(monkeypatch):
    monkeypatch.setattr(dropout, "_MIN_SHARE", 300)  # 1,003 elements: 3 shares, a ragged tail
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        x, y, seed = torch.ones(1003), torch.empty(1003), 2**63 + 12345
        dropout._dropout_into(y, x, seed, 0.3, relu=False)
    finally:
        torch.set_num_threads(threads)
    expected = splitmix64_keep(seed, 1003, round(0.3 * 2**16))
    assert torch.equal(y != 0, expected)


@needs_kernel
def test_kernel_masks_repeat_with_the_seed_and_not_with_the_thread_count():
    drop, x = FastDropout(0.5).train(), torch.ones(8 * dropout._MIN_SHARE)  # several shares
    threads = torch.get_num_threads()
    try:
        masks = []
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            masks.append((drop(x), drop(x)))
    finally:
        torch.set_num_threads(threads)
    (first, second), (again, _) = masks
    assert torch.equal(first, again)  # same seed, one or three threads: same mask
    assert not torch.equal(first, second)  # each call draws a new seed


@needs_kernel
def test_kernel_masks_are_uncorrelated_between_neighbours_and_calls():
    torch.manual_seed(0)
    drop, x = FastDropout(0.5).train(), torch.ones(1_000_000)
    a, b = ((drop(x) != 0).float() - 0.5 for _ in range(2))
    for u, v in ((a[:-1], a[1:]), (a[:-4], a[4:]), (a, b)):  # std of these means: 0.0005
        assert abs((u * v).mean().item() * 4) < 0.005


def test_inputs_the_kernel_does_not_take_use_the_torch_masks(monkeypatch):
    calls = []
    monkeypatch.setattr(dropout._KernelDropout, "apply", lambda *a: calls.append(1))
    drop = FastDropout(0.5).train()
    for dtype in (torch.bfloat16, torch.float64):
        y = drop(torch.ones(1000, dtype=dtype))
        assert y.dtype == dtype
        assert set(y.unique().tolist()) == {0.0, 2.0}
    assert not calls
