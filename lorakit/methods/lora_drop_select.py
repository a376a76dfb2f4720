"""LoRA-drop's selection pass (Zhou et al. 2024, arXiv 2402.07721, §3): sample, train briefly, score, keep.

1. D_s: a ``fraction`` of the training set, stratified by label for classification rows (int labels),
   else a seeded uniform sample (:func:`sample_indices`).
2. One short training of every LoRA (and a classification head) on D_s (:func:`brief_training`):
   a fresh AdamW over the method's parameter groups (the recipe's lr and weight decay), no warmup or
   schedule, the recipe's gradient clipping.
3. Importance (:func:`importance_scores`): g_i = Σ_{x∈D_s} Σ_tokens ‖s·B_i A_i x_i‖², where x_i ``(..., in)``
   is module i's actual input, taken in eval mode (no dropout) with the branch recomputed in fp32 outside
   autocast; positions with ``attention_mask == 0`` (padding) are left out. Packed rows carry no
   attention mask, so all their positions count.
4. I_i = g_i / Σ_j g_j; sorted descending, modules are kept until the cumulative I reaches the
   threshold T (:func:`choose_kept`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.methods.lora import LoraLayer


def _labels(dataset) -> list:
    if hasattr(dataset, "column_names"):
        return list(dataset["labels"]) if "labels" in dataset.column_names else []
    return [row.get("labels") for row in dataset]


def sample_indices(dataset, fraction: float, seed: int, stratify: bool) -> list[int]:
    """Sorted row indices of D_s, about ``fraction`` of ``dataset`` (at least one row).

    With ``stratify`` and integer labels, each class c with n_c rows contributes max(1, round(f·n_c))
    rows drawn without replacement; otherwise max(1, round(f·N)) rows are drawn uniformly. Both draws
    use a generator seeded with ``seed``.
    """
    n = len(dataset)
    gen = torch.Generator().manual_seed(seed)
    labels = _labels(dataset) if stratify else []
    if labels and all(isinstance(y, int) for y in labels):
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[y].append(i)
        chosen: list[int] = []
        for y in sorted(by_class):
            rows = by_class[y]
            k = min(len(rows), max(1, round(fraction * len(rows))))
            chosen += [rows[int(j)] for j in torch.randperm(len(rows), generator=gen)[:k]]
        return sorted(chosen)
    k = min(n, max(1, round(fraction * n)))
    return sorted(int(i) for i in torch.randperm(n, generator=gen)[:k])


def brief_training(ctx, subset: list, epochs: int, batch_size: int, groups: list[dict]) -> None:
    """``epochs`` passes over ``subset`` with a fresh AdamW over ``groups`` (the method's parameter
    groups: each its own lr and weight decay), constant lr, the recipe's gradient clipping. On several
    processes each rank runs its share of every batch (``batch_size`` rows per rank) and the gradients
    are summed over ranks before the step, so every rank takes the one-process step."""
    if epochs == 0:
        return
    cfg = ctx.recipe.train
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ctx.model.train()
    for epoch in range(epochs):
        for batch in ctx.batches(subset, batch_size, cfg.seed + epoch):
            items = ctx.global_items(batch)
            if batch is not None:  # None: this rank's share of a short last batch is empty
                ctx.loss_fn(batch, items).backward()
            ctx.world.sum_gradients(params)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def branch_sq_norm(layer: LoraLayer, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over rows of ‖s·B A x‖² (fp32 scalar) for x ``(..., in)``; rows where ``mask`` is 0 are left out.

    ``mask`` ``(batch, seq)`` applies only when x's leading shape equals it (a pooler's ``(batch, in)``
    input has no padding rows).
    """
    with torch.autocast(x.device.type, enabled=False):
        a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
        out = (x.float() @ a.t() @ b.t()) * layer.scaling
        sq = out.pow(2).sum(-1)
        if mask is not None and tuple(sq.shape) == tuple(mask.shape):
            sq = sq * mask.to(sq.dtype)
        return sq.sum()


@torch.no_grad()
def importance_scores(ctx, layers: dict[str, LoraLayer], subset: list, batch_size: int) -> dict[str, float]:
    """g_i for each layer name, over one eval-mode pass of ``subset`` (forward hooks on the layers)."""
    scores = {name: torch.zeros((), dtype=torch.float64, device=ctx.device) for name in layers}
    state: dict = {"mask": None}

    def hook_for(name: str):
        def hook(module, inputs, output):
            scores[name] += branch_sq_norm(module, inputs[0], state["mask"]).double()
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        for batch in ctx.batches(subset, batch_size, None):
            if batch is None:
                continue
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.to(ctx.device)
            ctx.loss_fn(batch)
    finally:
        for handle in handles:
            handle.remove()
        ctx.model.train(was_training)
    total = ctx.world.all_reduce_sum(torch.stack(list(scores.values())))  # several processes: every share
    return {name: float(value) for name, value in zip(scores, total)}


def choose_kept(scores: dict[str, float], threshold: float) -> tuple[list[str], dict[str, float]]:
    """(kept names in descending importance, I_i by name): the shortest prefix of the modules sorted by
    g (ties in model order) whose cumulative I = g/Σg reaches ``threshold``.

    Raises:
        LorakitError: every score is zero or not finite (nothing to rank).
    """
    total = sum(scores.values())
    if not math.isfinite(total) or total <= 0:
        raise LorakitError(
            "LoRA-drop: every importance score is zero or not finite; with selection_epochs: 0 the "
            "adapters are still at B = 0 — use selection_epochs >= 1"
        )
    importance = {name: g / total for name, g in scores.items()}
    order = sorted(scores, key=lambda name: -scores[name])  # stable: ties keep model order
    kept, cumulative = [], 0.0
    for name in order:
        kept.append(name)
        cumulative += importance[name]
        if cumulative >= threshold - 1e-9:
            break
    return kept, importance


def shape_groups(layers: dict[str, nn.Module], kept: list[str]) -> list[dict]:
    """The non-kept modules grouped by (in, out), in model order: ``[{"in", "out", "modules"}]``."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        if name not in kept:
            groups.setdefault((layer.in_features, layer.out_features), []).append(name)
    return [{"in": i, "out": o, "modules": names} for (i, o), names in groups.items()]
