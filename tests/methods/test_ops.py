"""The fused adapter ops against the plain formulas in fp64: exact in fp32, bf16 rounding under autocast.

Tolerances (relative Frobenius error against fp64): fp32 1e-6; bf16 autocast 1e-2 (bf16 has 8
mantissa bits: one rounding is ≤ 2^-9 ≈ 2e-3 relative).
"""

import pytest
import torch

from lorakit.methods import triton_ops
from lorakit.methods.ops import can_fuse, dora_scale, lora_into
from tests.methods import harness as H


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def tensors(seed=0, n=37, d_in=24, d_out=20, r=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g),
            torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g))


def test_lora_into_fp32_and_gradients():
    x, base, A, B = (t.requires_grad_() for t in tensors())
    out = lora_into(base, x, A, B, 0.7)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [t.grad.clone() for t in (x, base, A, B)]
    x64, base64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, base, A, B))
    ref = base64 + 0.7 * (x64 @ A64.t()) @ B64.t()
    ref.backward(grad.double())
    assert rel(out, ref) < 1e-6
    for g, r in zip(got, (x64.grad, base64.grad, A64.grad, B64.grad)):
        assert rel(g, r) < 1e-6


def test_lora_into_bf16_autocast():
    x, base, A, B = tensors(1)
    x, base = x.bfloat16(), base.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert can_fuse(x, base, A)
        out = lora_into(base, x, A, B, 2.0)
    assert out.dtype == torch.bfloat16
    assert rel(out, base.double() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()) < 1e-2


def test_can_fuse_needs_one_dtype_without_autocast():
    x, base, A, _ = tensors()
    assert can_fuse(x, base, A)
    assert not can_fuse(x.bfloat16(), base.bfloat16(), A)  # the plain path casts x to the adapter's fp32


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_dora_scale_values_and_gradients(with_bias, dtype, tol):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 33, 20, generator=g).to(dtype).requires_grad_()
    scale = (torch.rand(20, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(20, generator=g).to(dtype).requires_grad_() if with_bias else None
    y = dora_scale(t, scale, bias)
    grad = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(grad)
    t64, s64 = t.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    ref = s64 * (t64 - b64) + b64 if with_bias else s64 * t64
    ref.backward(grad.double())
    assert y.dtype == dtype and y.shape == t.shape
    assert rel(y, ref) < tol
    assert rel(t.grad, t64.grad) < tol
    assert rel(scale.grad, s64.grad) < tol  # the magnitude's gradient: fp32 sums
    if with_bias:
        assert rel(bias.grad, b64.grad) < tol


def test_dora_layer_fused_path_equals_plain_path():
    """The DoRA layer's fused path (addmm + DoraScale) against its plain formula, outputs and gradients."""
    import lorakit.methods.dora as dora

    cfg = {"name": "dora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
    fused_model, _ = H.make("llama", cfg)
    H.randomize_adapters(fused_model)
    plain_model, _ = H.make("llama", cfg)
    H.randomize_adapters(plain_model)
    inputs = {"input_ids": torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))}
    out = fused_model(**inputs).logits
    out.sum().backward()
    saved = dora.can_fuse
    dora.can_fuse = lambda *a: False
    try:
        ref = plain_model(**inputs).logits
        ref.sum().backward()
    finally:
        dora.can_fuse = saved
    assert rel(out, ref) < 1e-6
    for (n, p), (_, q) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
        if p.requires_grad:
            assert rel(p.grad, q.grad) < 1e-5, n


@pytest.mark.gpu
@pytest.mark.skipif(triton_ops.triton is None or not torch.cuda.is_available(), reason="needs Triton and CUDA")
def test_triton_dora_kernels_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(1000, 300, device="cuda", generator=g).bfloat16()
    scale = torch.rand(300, device="cuda", generator=g) + 0.5
    c = torch.randn(300, device="cuda", generator=g)
    assert rel(triton_ops.dora_forward(t, scale, c), t.double() * scale.double() + c.double()) < 1e-2
    grad = torch.randn(1000, 300, device="cuda", generator=g).bfloat16()
    gt, sgt, sg = triton_ops.dora_backward(grad, t, scale)
    assert rel(gt, grad.double() * scale.double()) < 1e-2
    assert rel(sgt, (grad.double() * t.double()).sum(0)) < 1e-5
    assert rel(sg, grad.double().sum(0)) < 1e-5
