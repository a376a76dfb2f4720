"""Attention in fp32 for a bf16 model on CPU (``train.precision`` bf16 there; :mod:`lorakit.precision`).

On CPU, PyTorch's SDPA flash kernel is about 3× slower in bf16 than in fp32 at lorakit's shapes
(measured on AVX-512 BF16, one thread: 4.5 vs 1.5 ms forward + backward at q ``(2, 9, 64, 64)``,
k/v ``(2, 3, 64, 64)``, causal, GQA), while casting q, k, v up and the output down costs little. So a
bf16 model on CPU gets transformers' SDPA attention wrapped as ``lorakit_sdpa_fp32``: q, k, v ``(B,
H, T, d)`` are cast to fp32, attention runs outside autocast (which would cast them back), the output
``(B, T, H, d)`` returns in the input dtype. The masks are transformers' SDPA masks; everything else
is transformers' ``sdpa_attention_forward``. Numerics: the softmax and both products in fp32 instead
of bf16 inputs with fp32 accumulation (closer to the fp32 reference, not further).
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "lorakit_sdpa_fp32"


def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa_attention_forward`` on fp32 copies of bf16 CPU inputs; returns
    ``(output in the input dtype, None)``. Other dtypes and devices pass through unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if query.device.type != "cpu" or dtype != torch.bfloat16:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                              attention_mask, **kwargs)
    return out.to(dtype), weights


def use_fp32_attention(model: nn.Module) -> bool:
    """Switch a bf16 model that uses SDPA attention to :func:`sdpa_fp32` (config-level, this model
    only). Returns True when switched; models on another attention implementation are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(model, "dtype", None) != torch.bfloat16:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_fp32)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    return True
