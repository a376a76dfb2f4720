"""DyLoRA (Valipour et al. 2022, arXiv 2210.07558, §3): one LoRA trained for every rank b ≤ r at once.

Parameters as LoRA with ``r`` = r_max: ``lora_A.weight`` A ``(r, in)`` Kaiming-uniform (U(±1/√in)),
``lora_B.weight`` B ``(out, r)`` zeros. Before each optimizer step one rank b is drawn uniformly from
{1..r} with the global torch RNG (so a resumed run, whose RNG state is restored, draws the same ranks),
shared by all layers and by all micro-batches of that step. The forward truncates:

    h = W0 x + b_0 + s_b · B[:, :b] (A[:b] dropout(x)),   s_b = lora_alpha / b   (rsLoRA: lora_alpha / √b)

``update: frozen`` (the default, the paper's and official code's mode): only row b of A and column b of B
learn; rows/columns < b enter the forward detached, and rows/columns ≠ b are restored after the
optimizer step, so AdamW's momentum and decoupled weight decay cannot move them either (their optimizer
moments keep decaying as under a zero gradient). ``update: all``: rows/columns 1..b all learn; in both
modes rows/columns > b, outside this step's model, are restored the same way.

Outside training the layer uses its settable rank ``rank`` (default r; :meth:`DyLora.set_rank`), which
evaluation (``evaluate(rank=..., ranks=...)``) and merging use. Merge at rank b:
W ← W0 + s_b · B[:, :b] A[:b] — exactly a plain LoRA of rank b. Trainable parameters per layer: r·(in + out).

Speed (same math): the branch runs at the full width r with the columns ≥ b of B zeroed
(B[:, :b] A[:b] = B·diag(1_{i<b})·A exactly), so every step has LoRA's matrix shapes, and is added to the
base output by LoRA's one ``addmm`` (:func:`lorakit.methods.ops.lora_into`) where the dtypes allow it; the
rows/columns that must not learn get their gradient zeroed by a mask instead of being cut off by
slicing and concatenation. In training the masks and s_b live in small device tensors that
:meth:`DyLora.start_step` overwrites in place (:class:`RankMasks`), so the layers read no Python
number that changes per step and a ``torch.compile``-d layer is not recompiled for every b. The restore after the optimizer step works on one flat copy of all A and B
(one multi-tensor copy in, one masked select, one multi-tensor copy back) instead of per-layer clones.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lorakit.methods.config import LoraConfig
from lorakit.errors import ArgumentError, LorakitError
from lorakit.methods.ops import can_fuse, lora_into
from lorakit.methods.registry import register
from lorakit.methods.base import Method
from lorakit.methods.lora import LoraLayer, adapter_input
from lorakit.methods.peft_export import lora_export

class RankMasks:
    """The training rank b of one step as device tensors, rewritten in place each step (same objects,
    so compiled graphs see new values, not new constants): ``train`` ``(r,)`` bool, True for the rows
    of A / columns of B that learn (lo ≤ i < b); ``scale`` ``(r,)`` fp32, s_b for i < b and 0 beyond."""

    def __init__(self, r: int, device: torch.device):
        self.train = torch.zeros(r, dtype=torch.bool, device=device)
        self.scale = torch.zeros(r, dtype=torch.float32, device=device)

    @torch.no_grad()
    def set(self, lo: int, b: int, s: float) -> None:
        i = torch.arange(self.train.numel(), device=self.train.device)  # built on the device: no host copy
        self.train.copy_((i >= lo) & (i < b))
        self.scale.copy_(torch.where(i < b, s, 0.0))


class DyLoraConfig(LoraConfig):
    """LoRA's fields (``r`` is r_max) plus ``update``: ``frozen`` (only rank b learns) or ``all``."""

    name: str = "dylora"
    update: Literal["frozen", "all"] = Field("frozen", description=
        "frozen: only row/column b of the drawn rank b learns (§3); all: rows 1..b learn")


class DyLoraLayer(LoraLayer):
    """LoRA truncated to rank ``train_rank`` in training and to ``rank`` otherwise."""

    def __init__(self, base_layer: nn.Module, cfg: DyLoraConfig):
        super().__init__(base_layer, cfg)
        self.lora_alpha, self.use_rslora, self.update = cfg.lora_alpha, cfg.use_rslora, cfg.update
        self.train_rank = self.r
        self.rank_masks: RankMasks | None = None  # set by DyLora.start_step
        self.set_rank(self.r)

    def rank_scaling(self, b: int) -> float:
        """s_b = lora_alpha / b, or lora_alpha / √b with rsLoRA."""
        return self.lora_alpha / (b**0.5 if self.use_rslora else b)

    def set_rank(self, b: int) -> None:
        """Use rank b (1 ≤ b ≤ r) outside training and for merging; ``scaling`` follows it."""
        self.rank, self.scaling = b, self.rank_scaling(b)

    def rank_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A ``(r, in)``, B ``(out, r)`` with columns ≥ b zeroed, s) for the rank b in use, so that
        s·B'A' = s_b·B[:, :b] A[:b] exactly. In training at rank b only rows/columns lo..b−1 of A and B
        get a gradient (lo = b − 1 with ``update: frozen``, else 0); the others get exact zeros, as if
        detached (rows ≥ b of A through B's zero columns). In training s_b is folded into B' (from
        :class:`RankMasks`) and s = 1; outside training s = s_b."""
        A, B = self.lora_A.weight, self.lora_B.weight
        masks = self.rank_masks
        if self.training and masks is not None and masks.train.device == A.device:
            A = torch.where(masks.train[:, None], A, A.detach())
            return A, torch.where(masks.train[None, :], B, B.detach()) * masks.scale, 1.0
        b = self.train_rank if self.training else self.rank
        if b < self.r:  # columns ≥ b of B zeroed
            B = torch.where(torch.arange(self.r, device=A.device) < b, B, 0)
        return A, B, self.rank_scaling(b)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        A, B, s = self.rank_weights()
        x = adapter_input(self.lora_dropout(x), A)
        return F.linear(F.linear(x, A), B) * s

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if can_fuse(x, base_out, self.lora_A.weight):
            A, B, s = self.rank_weights()
            return lora_into(base_out, self.lora_dropout(x), A, B, s)
        return base_out + self.lora_output(x).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        b = self.rank
        return self.rank_scaling(b) * (self.lora_B.weight[:, :b].float() @ self.lora_A.weight[:b].float())


class FlatSnapshot:
    """One flat copy of several A ``(r, in)`` / B ``(out, r)`` tensors of one device and dtype, plus
    each element's rank index (its row of A / column of B), to restore whole rank slices at once."""

    def __init__(self, tensors: list[tuple[torch.Tensor, int]], r: int):
        """``tensors``: (weight, dim of its rank index: 0 for A, 1 for B)."""
        self.params = [w for w, _ in tensors]
        ref = self.params[0]
        self.saved = torch.empty(sum(w.numel() for w in self.params), dtype=ref.dtype, device=ref.device)
        self.saved_views = self.views(self.saved)
        i = torch.arange(r, device=ref.device, dtype=torch.uint8 if r < 256 else torch.int32)
        self.rank = torch.cat([(i[:, None] if dim == 0 else i[None, :]).expand(w.shape).reshape(-1)
                               for w, dim in tensors])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view_as(w) for v, w in zip(flat.split([w.numel() for w in self.params]), self.params)]

    @torch.no_grad()
    def save(self) -> None:
        torch._foreach_copy_(self.saved_views, self.params)

    @torch.no_grad()
    def restore(self, lo: int, hi: int) -> None:
        """Every element outside rank slices lo..hi−1 back to its saved value (bit-exact)."""
        current = torch.empty_like(self.saved)
        torch._foreach_copy_(self.views(current), self.params)
        keep = self.rank == lo if hi - lo == 1 else (self.rank < hi) if lo == 0 else (self.rank >= lo) & (self.rank < hi)
        torch.where(keep, current, self.saved, out=self.saved)
        torch._foreach_copy_(self.params, self.saved_views)


def parse_ranks(ranks: str | list[int], r: int) -> list[int]:
    """``"all"`` → 1..r; ``"1,2,4"`` (or a list) → those ranks, sorted, deduplicated.

    Raises:
        LorakitError: a rank is not an integer in 1..r (the message names ``--ranks``).
    """
    if ranks == "all":
        return list(range(1, r + 1))
    items = ranks.split(",") if isinstance(ranks, str) else list(ranks)
    try:
        values = sorted({int(str(item).strip()) for item in items if str(item).strip()})
    except ValueError:
        raise ArgumentError(f"--ranks {ranks!r}: expected comma-separated integers in 1..{r}, or all") from None
    bad = [b for b in values if not 1 <= b <= r]
    if not values or bad:
        raise ArgumentError(f"--ranks {ranks!r}: DyLoRA ranks are 1..{r} (r_max of this adapter)")
    return values


@register
class DyLora(Method):
    name = "dylora"
    paper = "Valipour et al. 2022, arXiv 2210.07558"
    trains = "lora_A, lora_B (rank b drawn per step; frozen: only row/column b)"
    config_class = DyLoraConfig
    layer_class = DyLoraLayer
    shardable = False
    unsharded_reason = "it restores whole rank slices of A and B after each optimizer step"

    def export_peft(self, model: nn.Module):
        """Plain PEFT LoRA of the current rank b (:meth:`set_rank`): A[:b], B[:, :b], s_b = α/b (rsLoRA: α/√b)."""
        b, cfg = self.rank, self.cfg
        pairs = {p: (l.lora_A.weight[:b], l.lora_B.weight[:, :b]) for p, l in self.layers.items()}
        return lora_export(self, model, pairs, b, cfg.lora_alpha, cfg.use_rslora)

    def __init__(self, cfg: DyLoraConfig):
        super().__init__(cfg)
        self.current = cfg.r  # the rank drawn for the current training step
        self._masks: dict[torch.device, RankMasks] = {}  # this step's rank, per device of the layers
        self._snapshots: list[FlatSnapshot] = []
        self._snapshot_key: tuple = ()
        self._pending = False  # a snapshot waits to be restored

    # ---- training ------------------------------------------------------------------------------
    def draw_rank(self) -> int:
        """b ~ U{1..r} from the global torch RNG (checkpointed, so resume draws the same b); on several
        processes rank 0's draw, broadcast, so every rank trains the same b."""
        return self.world.broadcast_int(int(torch.randint(1, self.cfg.r + 1, ()).item()))

    def start_step(self, b: int) -> None:
        """Train the coming step at rank b; snapshot A and B to restore the untrained rows afterwards."""
        self.current = b
        for layer in self.layers.values():
            layer.train_rank = b
            dev = layer.lora_A.weight.device
            if dev not in self._masks:
                self._masks[dev] = RankMasks(self.cfg.r, dev)
            layer.rank_masks = self._masks[dev]
        lo = b - 1 if self.cfg.update == "frozen" else 0
        s_b = self.cfg.lora_alpha / (b**0.5 if self.cfg.use_rslora else b)
        for masks in self._masks.values():
            masks.set(lo, b, s_b)
        for snap in self.snapshots():
            snap.save()
        self._pending = True

    def snapshots(self) -> list[FlatSnapshot]:
        """One :class:`FlatSnapshot` per (device, dtype) of the adapters, rebuilt when a tensor moved."""
        tensors = [(w, dim) for l in self.layers.values() for w, dim in ((l.lora_A.weight, 0), (l.lora_B.weight, 1))]
        key = tuple((id(w), w.data_ptr()) for w, _ in tensors)
        if key != self._snapshot_key:
            groups: dict[tuple, list] = {}
            for w, dim in tensors:
                groups.setdefault((w.device, w.dtype), []).append((w, dim))
            self._snapshots = [FlatSnapshot(g, self.cfg.r) for g in groups.values()]
            self._snapshot_key = key
        return self._snapshots

    def before_step(self, step: int) -> None:
        self.start_step(self.draw_rank())

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Put back every row of A / column of B this step did not train (frozen: all but b; all: > b),
        undoing what AdamW's momentum and decoupled weight decay did to them."""
        if not self._pending:
            return
        b = self.current
        lo = b - 1 if self.cfg.update == "frozen" else 0
        for snap in self._snapshots:  # the ones start_step saved into
            snap.restore(lo, b)
        self._pending = False

    # ---- evaluation and merging -----------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The rank used outside training and for merging (r unless :meth:`set_rank` changed it)."""
        return next(iter(self.layers.values())).rank if self.layers else self.cfg.r

    def set_rank(self, b: int) -> None:
        """Evaluate and merge at rank b. Raises LorakitError unless 1 ≤ b ≤ r (naming ``--rank``)."""
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.cfg.r:
            raise ArgumentError(f"--rank {b!r}: DyLoRA ranks are 1..{self.cfg.r} (r_max of this adapter)")
        for layer in self.layers.values():
            layer.set_rank(b)

    def evaluate(self, run_eval: Callable[[], dict], rank: int | None = None,
                 ranks: str | list[int] | None = None) -> dict:
        """Metrics at the current rank; at ``rank`` (adds ``"rank": b``); or, with ``ranks`` ("1,2,4" or
        "all"), ``{"rank_b": metrics, ...}`` for each b plus the current rank's metrics at top level.
        The current rank is restored afterwards. Raises LorakitError for ranks outside 1..r, or both given."""
        if rank is not None and ranks is not None:
            raise ArgumentError("--rank and --ranks: give one of them")
        default = self.rank
        wanted = parse_ranks(ranks, self.cfg.r) if ranks is not None else []
        if rank is not None:
            self.set_rank(rank)
        try:
            if rank is not None:
                return {"rank": rank, **run_eval()}
            if not wanted:
                return run_eval()
            per_rank = {}
            for b in wanted:
                self.set_rank(b)
                per_rank[f"rank_{b}"] = run_eval()
            self.set_rank(default)
            top = per_rank.get(f"rank_{default}") or run_eval()
            return {**per_rank, **top}
        finally:
            self.set_rank(default)
