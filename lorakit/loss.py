"""The loss of one batch: the one function training and evaluation both call.

Causal LM: next-token cross-entropy summed (nats) over the label tokens (labels ≠ -100, position t
predicting ``labels[:, t + 1]`` as in transformers), computed without full-vocabulary logits where
``train.cross_entropy`` and the model allow it (:mod:`lorakit.fast.cross_entropy`), else from the
logits in fp32. Classification: cross-entropy of the logits ``(B, num_labels)`` summed over examples.
The trainer divides the sum by the loss items of its whole optimizer step (micro-batches included);
evaluation sums over all batches and divides once (nanoGPT's one loss, reused by ``estimate_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.device import to_device
from lorakit.fast.cross_entropy import IGNORE, causal_lm_loss
from lorakit.precision import autocast


@dataclass
class BatchLoss:
    """``summed``: the loss summed over the batch's loss items, a 0-d fp32 tensor on the device (with
    its graph when gradients are on); ``items``: how many; ``logits``: ``(B, num_labels)`` for
    classification, else None; ``labels``: the batch's labels on the device."""

    summed: torch.Tensor
    items: int
    logits: torch.Tensor | None
    labels: torch.Tensor


def count_loss_items(batch: dict, task: str) -> int:
    """Tokens that carry loss (causal LM, shifted by one) or examples (classification; -100: none)."""
    labels = batch["labels"]
    return int((labels != IGNORE).sum()) if task == "seq_cls" else int((labels[:, 1:] != IGNORE).sum())


def without_causal_padding_mask(batch: dict, task: str = "causal_lm") -> dict:
    """``batch`` without its ``attention_mask`` when that mask only marks right padding (each row ones
    then zeros) and ``task`` is a causal LM (``seq_cls`` batches are returned as they are): under the
    causal mask a real token never attends to a later pad token, so the real tokens' outputs, the loss
    (pads carry label -100) and every gradient are unchanged. Without the 2-D mask transformers passes
    ``is_causal`` to SDPA (causal kernels that skip the masked half, also under ``torch.compile``,
    which otherwise gets a dense mask) and skips its ``mask.all()`` check, a host-device sync per
    forward. Checked on the (CPU) tensor as given; any other mask (left padding, holes) is kept.
    Returns a new dict or ``batch`` itself."""
    mask = batch.get("attention_mask")
    if task == "seq_cls" or mask is None or mask.device.type != "cpu" or mask.ndim != 2:
        return batch
    if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
        return batch
    if bool((mask[:, 0] == 0).any()):  # an empty row: keep the mask (nothing to attend to)
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def _summed(model: nn.Module, batch: dict, task: str, cross_entropy: str, cpu_labels: torch.Tensor):
    """(Σ loss, logits or None) of a batch already on the device, inside the caller's autocast."""
    if task != "seq_cls" and cross_entropy != "full":  # chunked linear + CE: no full-vocabulary logits
        summed = causal_lm_loss(model, batch, 1, cross_entropy, cpu_labels)
        if summed is not None:
            return summed, None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if task == "seq_cls":
        logits = model(**inputs).logits.float()
        return F.cross_entropy(logits, labels, reduction="sum"), logits
    # use_cache=False: a cache would make packed rows attend across examples (see lorakit.data).
    logits = model(**inputs, use_cache=False).logits.float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum"), None


def batch_loss(model: nn.Module, batch: dict, task: str, device: torch.device, cross_entropy: str = "full",
               precision: str = "fp32", new_graph_step: bool = False) -> BatchLoss:
    """The loss of one collated ``batch`` (``input_ids`` / ``attention_mask`` / ``labels`` on the CPU),
    moved to ``device`` and run under ``precision``'s autocast (:mod:`lorakit.precision`).

    ``cross_entropy``: ``full`` (logits), ``chunked`` or ``liger`` (:mod:`lorakit.fast.cross_entropy`;
    the logits path where the model does not allow it). ``new_graph_step``: mark a new CUDA-graph
    iteration first (layers replayed as CUDA graphs may overwrite earlier outputs). Gradients follow
    the caller's grad mode."""
    batch = without_causal_padding_mask(batch, task)
    items = count_loss_items(batch, task)
    cpu_labels = batch["labels"]
    batch = to_device(batch, device)
    if new_graph_step:
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, precision):
        summed, logits = _summed(model, batch, task, cross_entropy, cpu_labels)
    return BatchLoss(summed, items, logits, batch["labels"])
