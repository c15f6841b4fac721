"""air-reg's small-head CPU attention kernel against SDPA in float64, and its fallbacks."""

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel
from einops import rearrange

from air_reg import speed
from air_reg.models.components.air import AiR
from air_reg.models.components.attention import MultiheadAttention
from air_reg.speed import attention as cpu_attention
from air_reg.speed import kernels
from air_reg.speed.dropout import FastDropout


def layer(attention: str = "auto", **kw) -> MultiheadAttention:
    """A MultiheadAttention through the speed door with ``speed.attention=attention``."""
    return speed.accelerate(
        MultiheadAttention(dim=kw.pop("dim", 16), heads=kw.pop("heads", 4), **kw),
        attention=attention,
    )


def reference(q, k, v, heads):
    """float64 SDPA on the same heads: the ground truth for float32 kernels."""
    q, k, v = (rearrange(t.double(), "b n (h e) -> b h n e", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)")


def errors(fn, q, k, v, heads, grad):
    """Largest |difference| to the float64 reference of the output and of dq, dk, dv."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, ref = fn(*leaves, heads), reference(*ref_leaves, heads)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    pairs = [(out, ref), *zip(grads, ref_grads, strict=True)]
    return [(a.double() - b).abs().max().item() for a, b in pairs]


def sdpa(q, k, v, heads):
    q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)")


@needs_kernel
@pytest.mark.parametrize("head", cpu_attention.HEAD_SIZES)
@pytest.mark.parametrize("tokens", [1, 7, 50])  # below, between and above the SIMD width
def test_kernel_matches_float64_reference_as_closely_as_sdpa(head, tokens):
    heads = 3
    q, k, v, grad = (torch.randn(2, tokens, heads * head) for _ in range(4))
    ours, theirs = (
        errors(cpu_attention.attention, q, k, v, heads, grad),
        errors(sdpa, q, k, v, heads, grad),
    )
    for mine, sdpa_err in zip(ours, theirs, strict=True):
        assert mine < max(4 * sdpa_err, 1e-6), (ours, theirs)


@needs_kernel
def test_kernel_reads_strided_projections_in_place_and_is_thread_count_independent():
    heads, proj = 4, torch.randn(3, 40, 3 * 16)
    q, k, v = proj.chunk(3, dim=-1)  # token stride 48, not 16
    assert q.stride(1) == 48
    strided = cpu_attention.attention(q, k, v, heads)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.attention(*(t.contiguous() for t in (q, k, v)), heads)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(strided, one)  # slices are computed alone: bit-identical
    assert torch.allclose(strided, reference(q, k, v, heads).float(), atol=1e-6)


@needs_kernel
def test_kernel_is_stable_for_near_one_hot_and_very_negative_scores():
    heads, k, v = 2, torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    # all scores -92.1: log-sum-exp = -128 in log2 units, where 2^(0 - lse) in the padded
    # SIMD lanes of the last key block (30 tokens) would overflow to inf without a clamp
    far = (torch.full((2, 30, 16), 92.12 / 8**0.5), -torch.ones(2, 30, 16))
    for q, keys in ((torch.randn(2, 30, 16) * 40, k), far):
        grad = torch.randn(2, 30, 16)  # 30 tokens: padded SIMD lanes in the last block
        mine = errors(cpu_attention.attention, q, keys, v, heads, grad)
        theirs = errors(sdpa, q, keys, v, heads, grad)
        assert all(e < max(4 * t, 1e-4) for e, t in zip(mine, theirs, strict=True)), mine


@needs_kernel
def test_kernel_backward_takes_broadcast_and_transposed_gradients():
    heads, q, k, v = 2, *(torch.randn(3, 9, 8, requires_grad=True) for _ in range(3))
    (cpu_attention.attention(q, k, v, heads).sum() * 2).backward()  # grad: stride 0
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (reference(*ref, heads).sum() * 2).backward()
    for mine, theirs in zip((q, k, v), ref, strict=True):
        assert torch.allclose(mine.grad.double(), theirs.grad, atol=1e-5)
    g = torch.randn(3, 8, 9).transpose(1, 2)  # token stride 1, channel stride 9
    out = cpu_attention.attention(q, k, v, heads)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(reference(*ref, heads), ref, g.double())
    for mine, theirs in zip(grads, ref_grads, strict=True):
        assert torch.allclose(mine.double(), theirs, atol=1e-5)


def test_kernel_rejects_inputs_it_cannot_take_with_the_reason():
    q = torch.randn(2, 5, 8)
    assert "float32" in cpu_attention.applicable(q.double(), q.double(), q.double(), 2)
    assert "head size" in cpu_attention.applicable(q[..., :6], q[..., :6], q[..., :6], 2)
    assert "one shape" in cpu_attention.applicable(q, q[:, :3], q[:, :3], 2)
    assert cpu_attention.applicable(q, q, q, 2) is None
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.attention(q.double(), q.double(), q.double(), 2)


def _pair(kernel: str, **kw) -> tuple[MultiheadAttention, MultiheadAttention]:
    a = layer(kernel, **kw)
    b = MultiheadAttention(dim=16, heads=4, **kw)  # the plain model: SDPA
    b.load_state_dict(a.state_dict())
    return a, b


@needs_kernel
@pytest.mark.parametrize("kernel", ["kernel", "auto"])
def test_attention_layer_with_kernel_matches_sdpa_forward_and_backward(kernel, monkeypatch):
    calls = []
    real = cpu_attention.apply
    monkeypatch.setattr(cpu_attention, "apply", lambda *a: calls.append(1) or real(*a))
    ours, theirs = _pair(kernel)
    x, mem = torch.randn(3, 49, 16), torch.randn(3, 49, 16)
    for args in ((x,), (x, mem)):  # self- and cross-attention
        out, ref = ours(*args), theirs(*args)
        out.square().sum().backward()
        ref.square().sum().backward()
        assert torch.allclose(out, ref, atol=1e-5)
    for p, r in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(p.grad, r.grad, atol=1e-4, rtol=1e-4)
    assert len(calls) == 2


def test_auto_uses_sdpa_for_attention_dropout_and_when_the_kernel_is_unavailable(
    monkeypatch, caplog
):
    calls = []
    monkeypatch.setattr(cpu_attention, "apply", lambda *a: calls.append(1))
    x = torch.randn(2, 10, 16)
    layer(attn_dropout=0.5).train()(x)
    assert not calls  # dropout on attention probabilities: SDPA

    tries = []

    def unavailable():
        tries.append(1)
        raise kernels.KernelUnavailable("no compiler (test)")

    monkeypatch.setattr(kernels, "library", unavailable)
    monkeypatch.setattr(kernels, "_failure", [])
    with caplog.at_level(logging.WARNING):
        out = layer()(x)
        layer()(x)
    assert out.shape == x.shape
    assert not calls
    assert [r.getMessage() for r in caplog.records].count(
        "air-reg's CPU kernels unavailable, using torch ops instead "
        "(SDPA attention, torch dropout masks): no compiler (test)"
    ) == 1  # warned once
    assert len(tries) == 1  # and the compiler is not tried again for every call
    with pytest.raises(kernels.KernelUnavailable, match="no compiler"):
        layer("kernel")(x)


def test_auto_leaves_head_size_16_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_attention, "apply", lambda *a: calls.append(1))
    layer(dim=32, heads=2)(torch.randn(2, 10, 32))  # slower than SDPA there
    assert not calls


def test_speed_settings_that_cannot_work_fail_when_applied():
    with pytest.raises(ValueError, match="speed.attention must be one of"):
        layer("flash")
    with pytest.raises(ValueError, match="speed.dropout must be one of"):
        speed.accelerate(AiR(), dropout="bernoulli")
    with pytest.raises(ValueError, match="no attention dropout"):
        layer("kernel", attn_dropout=0.1)
    with pytest.raises(ValueError, match="head size"):
        layer("kernel", dim=24, heads=2)


@needs_kernel
def test_air_with_kernel_gives_the_same_flow_and_gradients_as_with_sdpa():
    kw = {"image_size": 28, "patch_size": 2, "dropout": 0.0, "attn_dropout": 0.0}
    ours, theirs = speed.accelerate(AiR(**kw), attention="kernel"), AiR(**kw)
    theirs.load_state_dict(ours.state_dict())
    torch.nn.init.normal_(ours.branch.head.weight)
    theirs.branch.head.load_state_dict(ours.branch.head.state_dict())
    fixed, moving = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    flows = [net(fixed, moving) for net in (ours, theirs)]
    assert torch.allclose(*flows, atol=1e-5)
    for f in flows:
        f.square().mean().backward()
    for (name, p), r in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(p.grad, r.grad, atol=1e-5, rtol=1e-4), name


def test_auto_does_not_build_the_kernels_for_inputs_they_cannot_take(monkeypatch):
    tries = []
    monkeypatch.setattr(kernels, "library", lambda: tries.append(1))
    monkeypatch.setattr(kernels, "_failure", [])
    x = torch.randn(2, 10, 16, dtype=torch.float64)  # stands in for GPU or bf16 inputs
    layer().double()(x)
    FastDropout(0.5).train()(x)
    assert not tries
