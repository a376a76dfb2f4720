"""Held-out metrics: token loss and perplexity (causal LM), accuracy and macro-F1 (classification);
logits for the checks of merge and export; greedy samples."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.device import to_device
from lorakit.loss import batch_loss
from lorakit.precision import autocast


def eager_only():
    """Run compiled modules (``train.compile``) eagerly: token-by-token decoding with a growing cache
    would otherwise recompile the decoder layers for new shapes."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(num_labels, num_labels)`` int64 counts, rows = gold label, columns = prediction."""
    flat = labels.long() * num_labels + preds.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def confusion_metrics(confusion: torch.Tensor) -> tuple[float, float]:
    """(accuracy, macro-F1) from a confusion matrix; macro-F1 as :func:`macro_f1`."""
    tp = confusion.diag().double()
    fp, fn = confusion.sum(0).double() - tp, confusion.sum(1).double() - tp
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    accuracy = (torch.tensor(float(tp.sum()), dtype=torch.float32) / max(1, int(confusion.sum()))).item()
    return accuracy, float(f1.mean())


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
                   cross_entropy: str = "full", precision: str = "auto", reduce=None) -> dict:
    """Metrics over all ``batches`` (collated dicts with ``labels``), from the training loss
    (:func:`lorakit.loss.batch_loss`) summed over every batch and divided once.

    Causal LM: ``eval_loss`` = mean cross-entropy (nats) over label tokens (labels ≠ -100, shifted by
    one), ``perplexity`` = exp(eval_loss), ``eval_tokens``. Classification: ``eval_loss``, ``accuracy``,
    ``macro_f1``, ``eval_examples``. ``cross_entropy`` (``chunked`` / ``liger``, see
    :mod:`lorakit.fast.cross_entropy`) sums the causal-LM loss without full-vocabulary logits where the
    model allows it; ``full`` always computes the logits. ``precision`` (``train.precision``: auto,
    bf16, fp32; :mod:`lorakit.precision`) is the autocast decision, the same as training's.
    ``reduce`` (a distributed run: sum over ranks, in place) combines the loss sums, counts and the
    confusion matrix of every rank's share before the metrics are formed; rows labelled -100 count nowhere.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    preds, golds = [], []
    for batch in batches:
        out = batch_loss(model, batch, task, device, cross_entropy, precision, new_graph_step=device.type == "cuda")
        total += out.summed.item()
        count += out.items
        if out.logits is not None:
            keep = out.labels != -100
            preds.append(out.logits.argmax(-1)[keep].cpu())
            golds.append(out.labels[keep].cpu())
    model.train(was_training)
    if reduce is not None:
        sums = reduce(torch.tensor([total, float(count)], dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    loss = total / max(1, count)
    if task == "seq_cls":
        p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        g = torch.cat(golds) if golds else torch.zeros(0, dtype=torch.long)
        num_labels = int(model.config.num_labels)
        if reduce is None:
            accuracy, f1 = (p == g).float().mean().item(), macro_f1(p, g, num_labels)
        else:
            accuracy, f1 = confusion_metrics(reduce(confusion_matrix(p, g, num_labels)))
        return {"eval_loss": loss, "accuracy": accuracy, "macro_f1": f1, "eval_examples": count}
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


@torch.no_grad()
def batch_logits(model: nn.Module, batches: Iterable[dict], device: torch.device, precision: str) -> list[torch.Tensor]:
    """The fp32 logits of each batch (labels ignored) on the CPU, in eval mode: what merge and export
    compare between the adapter model and the model they wrote."""
    model.eval()
    outs = []
    for batch in batches:
        batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
        with autocast(device, precision):
            outs.append(model(**batch).logits.float().cpu())
    return outs


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
