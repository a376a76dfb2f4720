"""Triton kernels for DoRA's rescaling (CUDA; :class:`lorakit.methods.ops.DoraScale` falls back to torch ops).

Forward, one pass: y = t ⊙ σ + c over ``(N, out)`` tiles, t and y in t's dtype, arithmetic in fp32
(σ = m/n and c = (1 − σ) ⊙ b stay fp32, so magnitude updates below bf16 resolution still reach y).
Backward, one pass: ∂L/∂t = g ⊙ σ (in g's dtype) and per-tile column sums of g ⊙ t and g in fp32,
written to a ``(tiles, out)`` buffer and summed by torch afterwards (deterministic: no atomics).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # no Triton (CPU-only torch): the torch path is used
    triton = None

BM, BN = 64, 128

if triton is not None:

    @triton.jit
    def _dora_fwd(t_ptr, s_ptr, c_ptr, y_ptr, n_rows, n_cols, HAS_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        y = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(s_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_C:
            y += tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dora_bwd(g_ptr, t_ptr, s_ptr, gt_ptr, part_gt_ptr, part_g_ptr, n_rows, n_cols,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        tl.store(gt_ptr + offs, (g * s[None, :]).to(gt_ptr.dtype.element_ty), mask=mask)
        tl.store(part_gt_ptr + pid_m * n_cols + cols, tl.sum(g * t, axis=0), mask=col_ok)
        tl.store(part_g_ptr + pid_m * n_cols + cols, tl.sum(g, axis=0), mask=col_ok)


def available(t: torch.Tensor) -> bool:
    """Triton kernels apply: a CUDA tensor, Triton importable, not inside torch.compile's tracing."""
    return triton is not None and t.is_cuda and not torch.compiler.is_compiling()


def dora_forward(t: torch.Tensor, scale: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """y = t ⊙ scale + c for contiguous t ``(N, out)``; scale, c fp32 ``(out,)``; y in t's dtype."""
    n, m = t.shape
    y = torch.empty_like(t)
    grid = (triton.cdiv(n, BM), triton.cdiv(m, BN))
    _dora_fwd[grid](t, scale, c if c is not None else scale, y, n, m, HAS_C=c is not None, BLOCK_M=BM, BLOCK_N=BN)
    return y


def dora_backward(g: torch.Tensor, t: torch.Tensor, scale: torch.Tensor):
    """(g ⊙ scale in g's dtype, Σ_rows g ⊙ t fp32 ``(out,)``, Σ_rows g fp32 ``(out,)``)."""
    n, m = g.shape
    tiles = triton.cdiv(n, BM)
    grad_t = torch.empty_like(g)
    part_gt = torch.empty(tiles, m, dtype=torch.float32, device=g.device)
    part_g = torch.empty(tiles, m, dtype=torch.float32, device=g.device)
    _dora_bwd[(tiles, triton.cdiv(m, BN))](g, t, scale, grad_t, part_gt, part_g, n, m, BLOCK_M=BM, BLOCK_N=BN)
    return grad_t, part_gt.sum(0), part_g.sum(0)
