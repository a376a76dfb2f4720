"""LoRA-drop (Zhou et al. 2024, arXiv 2402.07721, §3; COLING 2025): keep the LoRAs whose output matters,
share one LoRA among the rest.

Every target module starts as a plain LoRA (``lorakit.methods.lora``): h = W0 x + b + s·B A dropout(x),
A ``(r, in)`` Kaiming-uniform, B ``(out, r)`` zeros, s = lora_alpha / r (rsLoRA: / √r).
Before training (the ``prepare`` hook, skipped on resume) the selection pass of
``lorakit.methods.lora_drop_select`` runs: a sample D_s (``sample_fraction`` of the training set,
stratified by label for classification), ``selection_epochs`` of training on D_s, then the importance
g_i = Σ_{x∈D_s} ‖s·B_i A_i x_i‖² on each module's actual inputs (padding excluded), I_i = g_i / Σ_j g_j,
and the modules sorted by I are kept until the cumulative I reaches ``threshold``.

Kept modules keep their own A/B. **lorakit:** the others share one pair per (in, out) shape group:
every layer of a group holds the *same* ``lora_A``/``lora_B`` ``nn.Linear`` modules (so q and gate, of
different shapes, never share). With ``reinit`` (default) the kept pairs are re-initialized in place
and every shared pair is fresh (A Kaiming, B = 0), and the other trainable tensors (a classification
head) go back to their values before the selection pass; without it the kept pairs keep their brief
training and the shared pairs still start fresh (B = 0). Trainable adapter parameters afterwards:
Σ_kept r·(in+out) + Σ_groups r·(in+out).

Merge: per module as in LoRA, W ← W0 + s·B A; a shared pair merges into every module that uses it.
State (``state_dict``): the selection (scores, importance, kept list, shared groups), so
``load_state_dict`` rebuilds the sharing before the adapter weights load. The selection is printed as a
table and written to ``<output_dir>/lora_drop_selection.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from pydantic import Field
from rich.table import Table
from torch import nn

from lorakit.methods.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.methods.registry import register
from lorakit.methods.base import Method, kaiming_uniform_
import lorakit.methods.lora_drop_select as sel
from lorakit.methods.lora import LoraLayer

SELECTION_FILE = "lora_drop_selection.json"


class LoraDropConfig(LoraConfig):
    sample_fraction: float = Field(0.1, gt=0, le=1, description="share of the training data the selection pass sees")
    threshold: float = Field(0.9, gt=0, le=1, description="keep the most important modules until their summed importance reaches this share (§3)")
    reinit: bool = Field(True, description="after selection, re-initialize the kept pairs and restore the head (else kept pairs keep their training)")
    selection_epochs: int = Field(1, ge=0, description="epochs of plain LoRA over the sample before selecting")
    selection_batch_size: int | None = Field(None, gt=0, description="batch size of the selection pass; null: train.batch_size")


def _fresh_pair(layer: LoraLayer) -> tuple[nn.Linear, nn.Linear]:
    device = layer.lora_A.weight.device
    a = nn.Linear(layer.in_features, layer.r, bias=False, device=device, dtype=torch.float32)
    b = nn.Linear(layer.r, layer.out_features, bias=False, device=device, dtype=torch.float32)
    kaiming_uniform_(a.weight)
    nn.init.zeros_(b.weight)
    return a, b


@register
class LoraDrop(Method):
    name = "lora_drop"
    paper = "Zhou et al. 2024, arXiv 2402.07721"
    trains = "lora_A, lora_B (kept modules: own pair; others: one shared pair per shape)"
    config_class = LoraDropConfig
    layer_class = LoraLayer
    shardable = False
    unsharded_reason = "its non-kept modules share one A/B pair across layers"

    def __init__(self, cfg: LoraDropConfig):
        super().__init__(cfg)
        self.selection: dict | None = None

    # ---- sharing --------------------------------------------------------------------------------
    def apply_selection(self, selection: dict) -> None:
        """Give each shape group of ``selection["shared_groups"]`` one fresh shared A/B pair.

        Raises:
            LorakitError: the selection names a module this model does not adapt, or a group mixes shapes.
        """
        for group in selection["shared_groups"]:
            missing = [n for n in group["modules"] if n not in self.layers]
            if missing:
                raise LorakitError(f"LoRA-drop selection names {missing[0]}, which this model does not adapt")
            members = [self.layers[n] for n in group["modules"]]
            if any((m.in_features, m.out_features) != (group["in"], group["out"]) for m in members):
                raise LorakitError(f"LoRA-drop shared group {group['in']}x{group['out']} mixes shapes")
            shared_a, shared_b = _fresh_pair(members[0])
            for layer in members:
                layer.lora_A, layer.lora_B = shared_a, shared_b
        self.selection = selection

    def adapter_parameter_count(self) -> int:
        """Distinct lora_A/lora_B elements over all layers (a shared pair counts once)."""
        seen = {id(p): p for layer in self.layers.values() for mod in (layer.lora_A, layer.lora_B)
                for p in mod.parameters()}
        return sum(p.numel() for p in seen.values())

    # ---- hooks ----------------------------------------------------------------------------------
    def prepare(self, ctx) -> None:
        """Run the selection pass on ``ctx.data.train``, apply the sharing, print and save the selection."""
        if self.selection is not None:
            ctx.console.print("LoRA-drop: selection already made; not redone")
            return
        cfg, train = self.cfg, ctx.recipe.train
        batch_size = cfg.selection_batch_size or train.batch_size
        stratify = ctx.recipe.model.task == "seq_cls"
        idx = sel.sample_indices(ctx.data.train, cfg.sample_fraction, train.seed, stratify)
        subset = [ctx.data.train[i] for i in idx]
        others = {n: p for n, p in ctx.model.named_parameters()
                  if p.requires_grad and "lora_A" not in n and "lora_B" not in n}
        snapshot = {n: p.detach().clone() for n, p in others.items()}
        before = self.adapter_parameter_count()
        groups = self.param_groups(ctx.model, train)
        sel.brief_training(ctx, subset, cfg.selection_epochs, batch_size, groups)
        scores = sel.importance_scores(ctx, self.layers, subset, batch_size)
        kept, importance = sel.choose_kept(scores, cfg.threshold)
        selection = {
            "scores": scores, "importance": importance, "kept": kept,
            "shared_groups": sel.shape_groups(self.layers, kept),
            "threshold": cfg.threshold, "sample_size": len(idx), "train_size": len(ctx.data.train),
            "stratified": stratify, "selection_epochs": cfg.selection_epochs, "reinit": cfg.reinit,
        }
        self.apply_selection(selection)
        if cfg.reinit:
            for name in kept:
                self.layers[name].reset_lora_parameters()
            with torch.no_grad():
                for name, param in others.items():
                    param.copy_(snapshot[name])
        selection["adapter_parameters"] = {"before": before, "after": self.adapter_parameter_count()}
        ctx.console.print(self.selection_table())
        if ctx.world.is_main:
            run_dir = Path(ctx.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / SELECTION_FILE).write_text(json.dumps(selection, indent=1))

    def selection_table(self) -> Table:
        s = self.selection
        counts = s.get("adapter_parameters", {})
        table = Table(title=(f"LoRA-drop: kept {len(s['kept'])} of {len(s['scores'])} modules "
                             f"(threshold {s['threshold']}, |D_s| = {s.get('sample_size', '?')}); adapter "
                             f"parameters {counts.get('before', 0):,} → {counts.get('after', 0):,}"))
        for col, justify in (("#", "right"), ("module", "left"), ("g", "right"), ("I", "right"),
                             ("cumulative I", "right"), ("LoRA", "left")):
            table.add_column(col, justify=justify, overflow="fold")
        shared_by = {n: f"shared {g['in']}x{g['out']}" for g in s["shared_groups"] for n in g["modules"]}
        cumulative = 0.0
        for rank, name in enumerate(sorted(s["scores"], key=lambda n: -s["scores"][n]), 1):
            cumulative += s["importance"][name]
            table.add_row(str(rank), name, f"{s['scores'][name]:.4g}", f"{s['importance'][name]:.4f}",
                          f"{cumulative:.4f}", "own" if name in s["kept"] else shared_by[name])
        return table

    def state_dict(self) -> dict:
        return {} if self.selection is None else {"selection": copy.deepcopy(self.selection)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("selection"):
            self.apply_selection(copy.deepcopy(state["selection"]))
