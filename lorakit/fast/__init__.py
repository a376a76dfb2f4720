"""Model-level performance pieces used by ``lorakit train`` (measured in docs/benchmarks.md, scripts/bench_gpu.py).

- :mod:`lorakit.fast.cross_entropy`: causal-LM loss as a chunked linear + cross-entropy (no
  full-vocabulary fp32 logits), ``train.cross_entropy`` (auto | chunked | liger | full).
- :mod:`lorakit.fast.attention`: fp32 attention for a bf16 model on CPU.
- :mod:`lorakit.fast.kernels`: liger-kernel RMSNorm/SwiGLU (``train.kernels``), ``torch.compile``
  of decoder layers (``train.compile``).

Numerics: the default path (``auto``) equals the plain path up to rounding. Stated tolerances: in
fp32 the first 50 losses of a LoRA or DoRA run agree with PEFT's fp32 reference within 1e-5 relative
(tests/fast/test_tracking.py, CI); under bf16 autocast the fused ops agree with fp64 within 1e-2
relative (tests/methods/test_ops.py), and on the GPU the first 50 losses stay within 1e-2 relative of
PEFT's fp32-adapter path on the same bf16 base (measured 2.0e-3 through the default compiled,
CUDA-graph path; scripts/bench_gpu.py, docs/benchmarks.md); so do they on the bf16 CPU path with a
tiny model (``train.precision: bf16``, :mod:`lorakit.precision`; tests/fast/test_tracking.py).
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.fast.cross_entropy import causal_lm_loss, linear_cross_entropy, liger_available, resolve_impl
from lorakit.fast.kernels import accelerate


def resolve_cross_entropy(choice: str, device: torch.device) -> str:
    """The loss implementation for ``train.cross_entropy``. Raises LorakitError for ``liger`` without
    liger-kernel."""
    impl = resolve_impl(choice, device)
    if impl == "liger" and not liger_available():
        raise LorakitError("train.cross_entropy liger: liger-kernel is not installed (pip install liger-kernel; "
                           "needs CUDA); use auto or chunked")
    return impl


__all__ = ["accelerate", "causal_lm_loss", "linear_cross_entropy", "resolve_cross_entropy"]
