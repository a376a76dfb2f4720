"""Causal-LM loss without full-vocabulary logits: a chunked linear + cross-entropy.

The standard path computes logits ``(B, T, V)`` for every position, upcasts them to fp32 and keeps
``log_softmax`` for the backward pass: at batch 8 × 1024 and V = 151,936 (Qwen2.5) that is about
15 GB. Here the head ``W`` ``(V, d)`` is applied to ``hidden`` ``(N, d)`` one chunk of rows at a time:

    loss = Σ_{i: y_i ≠ -100} (logsumexp_v (h_i·w_v) − h_i·w_{y_i})      (fp32, divided by ``num_items``)

and the gradient of each chunk is taken in the same pass (``softmax − onehot``, in fp32, then one
matmul back to ``(c, d)``), so the backward pass only scales a stored ``(N, d)`` gradient. Peak extra
memory: one chunk of fp32 logits (≈ ``CHUNK_BYTES``). Rows whose label is -100 (prompt tokens,
padding, the last position) are dropped before the head, so they cost nothing.

Implementations (``train.cross_entropy``): ``chunked`` (this module, any device), ``liger``
(``liger_kernel``'s fused linear cross-entropy, CUDA + Triton; chunks of about 1024 rows),
``full`` (transformers' own loss on full logits), ``auto`` (liger on CUDA when installed, else
chunked). The logits are computed in the autocast dtype when autocast is on (bf16 on GPU, like the
standard ``lm_head`` under autocast), else in the head's dtype; softmax statistics are fp32.
Equality with transformers' loss: tests/fast/test_cross_entropy.py (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.device import to_device

CHUNK_BYTES = 2**29  # fp32 logits per chunk: 512 MiB
LIGER_CHUNK_ROWS = 1024  # liger's default (chunk logits ≈ hidden size) reads the head 128× at V/d = 170
IGNORE = -100
# model types whose ``forward`` is backbone → ``lm_head`` → loss, with nothing between (no soft-capping
# or logit scaling); anything else uses transformers' own loss.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gpt2")
_LOGIT_TWEAKS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_rows(vocab: int, rows: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``CHUNK_BYTES`` (a multiple of 64)."""
    c = max(64, (CHUNK_BYTES // (4 * vocab)) // 64 * 64)
    return min(rows, c) if rows else 1


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(hidden @ weightᵀ, labels); gradients for ``hidden`` only (``weight`` frozen).

    hidden ``(N, d)``, weight ``(V, d)``, labels ``(N,)`` int64 (``-100`` rows contribute nothing).
    Returns a 0-d fp32 tensor. ``compute_dtype`` is the dtype of the logits matmul.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, compute_dtype, chunk):
        need_grad = ctx.needs_input_grad[0]
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(compute_dtype)
                y = labels[start : start + chunk]
                valid = y != IGNORE
                y0 = torch.where(valid, y, 0).unsqueeze(1)
                logp = torch.log_softmax(F.linear(h, w), dim=-1, dtype=torch.float32)  # (c, V)
                total -= (logp.gather(1, y0).squeeze(1) * valid).sum()
                if need_grad:
                    probs = logp.exp_()  # softmax, in place
                    probs.scatter_add_(1, y0, torch.full_like(y0, -1, dtype=probs.dtype))
                    g = torch.empty(probs.shape, dtype=compute_dtype, device=probs.device)
                    torch.mul(probs, valid.unsqueeze(1), out=g)  # one pass: mask rows, cast
                    del probs, logp
                    grad[start : start + chunk] = (g @ w).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # ImportError, or Triton missing / no GPU
        return False
    return True


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         impl: str = "chunked") -> torch.Tensor:
    """Σ_i CE(hidden_i·Wᵀ, labels_i) over rows with label ≠ -100, as a 0-d fp32 tensor.

    hidden ``(N, d)``; weight ``(V, d)`` frozen (no gradient is computed for it); labels ``(N,)``.
    ``impl``: ``chunked`` (torch, any device) or ``liger`` (CUDA). Raises ValueError for other names.
    """
    dtype = _compute_dtype(hidden, weight)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        h, w = hidden.to(dtype), weight.to(dtype)
        (rows, d), vocab = hidden.shape, weight.shape[0]
        chunks = max(1, -(-rows // LIGER_CHUNK_ROWS))  # liger sizes chunks as rows / ceil(V / (mem · d))
        mem = max(1, -(-vocab // (chunks * d)))
        return liger_fused_linear_cross_entropy(h, w, labels, reduction="sum", chunk_mem_const=mem).float()
    if impl != "chunked":
        raise ValueError(f"linear_cross_entropy impl {impl!r}: expected chunked or liger")
    chunk = chunk_rows(weight.shape[0], hidden.shape[0])
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, dtype, chunk)


def resolve_impl(choice: str, device: torch.device) -> str:
    """``auto`` → ``liger`` on CUDA when liger-kernel imports, else ``chunked``; others unchanged."""
    if choice == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "chunked"
    return choice


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` LM head this loss can fuse, or None (unsupported model, adapted or
    quantized or trainable head, a bias, logit soft-capping/scaling)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED:
        return None
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TWEAKS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if not hasattr(model, getattr(model, "base_model_prefix", "") or "-"):
        return None
    return head


def loss_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets) of the next-token loss: ``rows`` indexes the flattened ``(B·T,)`` positions whose
    shifted label (``labels[:, t + 1]``) is not -100, ``targets`` are those labels. Computed where
    ``labels`` lives: on a CPU tensor this costs the GPU nothing (``nonzero`` on a CUDA tensor makes the
    host wait for the GPU)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    rows = (shifted != IGNORE).nonzero().squeeze(1)
    return rows, shifted.index_select(0, rows)


def causal_lm_loss(model: nn.Module, batch: dict, num_items: int, impl: str = "chunked",
                   cpu_labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum of next-token cross-entropy over ``batch`` divided by ``num_items``, without full logits.

    ``batch``: ``input_ids`` ``(B, T)``, ``labels`` ``(B, T)`` (-100 = no loss), optionally
    ``attention_mask`` / ``position_ids``. Position t predicts ``labels[:, t + 1]`` (transformers'
    shift). ``cpu_labels``: the same labels still on the CPU, if the caller has them (the rows with
    loss are then found without a host-device sync). Returns None when :func:`fused_head` refuses the
    model (the caller uses the full path).
    """
    head = fused_head(model)
    if head is None:
        return None
    backbone = getattr(model, model.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    rows, targets = loss_rows(cpu_labels if cpu_labels is not None else batch["labels"])
    if rows.device != hidden.device:
        moved = to_device({"rows": rows, "targets": targets}, hidden.device)
        rows, targets = moved["rows"], moved["targets"]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return linear_cross_entropy(hidden, head.weight, targets, impl) / num_items
