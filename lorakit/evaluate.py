"""Held-out metrics: token loss and perplexity (causal LM), accuracy and macro-F1 (classification)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.precision import autocast


def eager_only():
    """Run compiled modules (``train.compile``) eagerly: token-by-token decoding with a growing cache
    would otherwise recompile the decoder layers for new shapes."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch``'s tensors on ``device``. To a GPU they go through pinned host memory with
    ``non_blocking=True``: a copy from pageable memory can make the host wait for the GPU's queue."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True) for k, v in batch.items()}


def without_causal_padding_mask(batch: dict, task: str = "causal_lm") -> dict:
    """``batch`` without its ``attention_mask`` when that mask only marks right padding (each row ones
    then zeros) and ``task`` is a causal LM (``seq_cls`` batches are returned as they are): under the causal mask a real token never attends to a later pad token,
    so the real tokens' outputs, the loss (pads carry label -100) and every gradient are unchanged.
    Without the 2-D mask transformers passes ``is_causal`` to SDPA (causal kernels that skip the masked
    half, also under ``torch.compile``, which otherwise gets a dense mask) and skips its
    ``mask.all()`` check, a host-device sync per forward. Checked on the (CPU) tensor as given; any
    other mask (left padding, holes) is kept. Returns a new dict or ``batch`` itself."""
    mask = batch.get("attention_mask")
    if task == "seq_cls" or mask is None or mask.device.type != "cpu" or mask.ndim != 2:
        return batch
    if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
        return batch
    if bool((mask[:, 0] == 0).any()):  # an empty row: keep the mask (nothing to attend to)
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN); a class absent from both counts 0."""
    scores = []
    for c in range(num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, num_labels)


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Iterable[dict], task: str, device: torch.device,
                   cross_entropy: str = "full", precision: str = "auto") -> dict:
    """Metrics over all ``batches`` (collated dicts with ``labels``).

    Causal LM: ``eval_loss`` = mean cross-entropy (nats) over label tokens (labels ≠ -100, shifted by
    one), ``perplexity`` = exp(eval_loss), ``eval_tokens``. Classification: ``eval_loss``, ``accuracy``,
    ``macro_f1``, ``eval_examples``. ``cross_entropy`` (``chunked`` / ``liger``, see
    :mod:`lorakit.fast.cross_entropy`) sums the causal-LM loss without full-vocabulary logits where the
    model allows it; ``full`` always computes the logits. ``precision`` (``train.precision``: auto,
    bf16, fp32; :mod:`lorakit.precision`) is the autocast decision, the same as training's.
    """
    from lorakit.fast.cross_entropy import causal_lm_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    preds, golds = [], []
    for batch in batches:
        batch = to_device(without_causal_padding_mask(batch, task), device)
        if device.type == "cuda":  # layers replayed as CUDA graphs (train.compile) start a new iteration
            torch.compiler.cudagraph_mark_step_begin()
        if task != "seq_cls" and cross_entropy != "full":
            with autocast(device, precision):
                summed = causal_lm_loss(model, batch, 1, cross_entropy)  # Σ CE over label tokens
            if summed is not None:
                total += summed.item()
                count += (batch["labels"][:, 1:] != -100).sum().item()
                continue
        labels = batch.pop("labels")
        with autocast(device, precision):
            logits = model(**batch).logits.float()
        if task == "seq_cls":
            total += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            preds.append(logits.argmax(-1).cpu())
            golds.append(labels.cpu())
        else:
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            total += nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            ).item()
            count += (shift_labels != -100).sum().item()
    model.train(was_training)
    loss = total / max(1, count)
    if task == "seq_cls":
        p, g = torch.cat(preds), torch.cat(golds)
        num_labels = int(model.config.num_labels)
        return {
            "eval_loss": loss,
            "accuracy": (p == g).float().mean().item(),
            "macro_f1": macro_f1(p, g, num_labels),
            "eval_examples": count,
        }
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list, device: torch.device, max_new_tokens: int = 48,
                     precision: str = "auto") -> list[str]:
    """Greedy continuations of ``prompts`` (chat message lists go through the chat template), under the
    autocast of ``precision`` (``train.precision``)."""
    was_training = model.training
    model.eval()
    outputs = []
    for prompt in prompts:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        with autocast(device, precision), eager_only():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return outputs
