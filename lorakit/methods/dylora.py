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
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import MethodConfig
from lorakit.errors import LorakitError
from lorakit.methods import register
from lorakit.methods.base import Method
from lorakit.methods.lora import LoraLayer, adapter_input


class DyLoraConfig(MethodConfig):
    """LoRA's fields (``r`` is r_max) plus ``update``: ``frozen`` (only rank b learns) or ``all``."""

    name: str = "dylora"
    update: Literal["frozen", "all"] = "frozen"


class DyLoraLayer(LoraLayer):
    """LoRA truncated to rank ``train_rank`` in training and to ``rank`` otherwise."""

    def __init__(self, base_layer: nn.Module, cfg: DyLoraConfig):
        super().__init__(base_layer, cfg)
        self.lora_alpha, self.use_rslora, self.update = cfg.lora_alpha, cfg.use_rslora, cfg.update
        self.train_rank = self.r
        self.set_rank(self.r)

    def rank_scaling(self, b: int) -> float:
        """s_b = lora_alpha / b, or lora_alpha / √b with rsLoRA."""
        return self.lora_alpha / (b**0.5 if self.use_rslora else b)

    def set_rank(self, b: int) -> None:
        """Use rank b (1 ≤ b ≤ r) outside training and for merging; ``scaling`` follows it."""
        self.rank, self.scaling = b, self.rank_scaling(b)

    def truncated(self, b: int, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b] ``(b, in)``, B[:, :b] ``(out, b)``); with ``frozen`` all but the last row/column detached."""
        A, B = self.lora_A.weight[:b], self.lora_B.weight[:, :b]
        if frozen and b > 1:
            A = torch.cat([A[: b - 1].detach(), A[b - 1 :]], dim=0)
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 :]], dim=1)
        return A, B

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        b = self.train_rank if self.training else self.rank
        A, B = self.truncated(b, frozen=self.training and self.update == "frozen")
        x = adapter_input(self.lora_dropout(x), A)
        return F.linear(F.linear(x, A), B) * self.rank_scaling(b)

    def delta_weight(self) -> torch.Tensor:
        b = self.rank
        return self.rank_scaling(b) * (self.lora_B.weight[:, :b].float() @ self.lora_A.weight[:b].float())


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
        raise LorakitError(f"--ranks {ranks!r}: expected comma-separated integers in 1..{r}, or all") from None
    bad = [b for b in values if not 1 <= b <= r]
    if not values or bad:
        raise LorakitError(f"--ranks {ranks!r}: DyLoRA ranks are 1..{r} (r_max of this adapter)")
    return values


@register
class DyLora(Method):
    name = "dylora"
    paper = "Valipour et al. 2022, arXiv 2210.07558"
    trains = "lora_A, lora_B (rank b drawn per step; frozen: only row/column b)"
    config_class = DyLoraConfig
    layer_class = DyLoraLayer

    def __init__(self, cfg: DyLoraConfig):
        super().__init__(cfg)
        self.current = cfg.r  # the rank drawn for the current training step
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- training ------------------------------------------------------------------------------
    def draw_rank(self) -> int:
        """b ~ U{1..r} from the global torch RNG (checkpointed, so resume draws the same b)."""
        return int(torch.randint(1, self.cfg.r + 1, ()).item())

    def start_step(self, b: int) -> None:
        """Train the coming step at rank b; snapshot A and B to restore the untrained rows afterwards."""
        self.current = b
        for layer in self.layers.values():
            layer.train_rank = b
        self._snapshot = {n: (l.lora_A.weight.detach().clone(), l.lora_B.weight.detach().clone())
                          for n, l in self.layers.items()}

    def before_step(self, step: int) -> None:
        self.start_step(self.draw_rank())

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Put back every row of A / column of B this step did not train (frozen: all but b; all: > b),
        undoing what AdamW's momentum and decoupled weight decay did to them."""
        b = self.current
        lo = b - 1 if self.cfg.update == "frozen" else 0
        for name, (A0, B0) in self._snapshot.items():
            layer = self.layers[name]
            A0[lo:b] = layer.lora_A.weight[lo:b]
            B0[:, lo:b] = layer.lora_B.weight[:, lo:b]
            layer.lora_A.weight.copy_(A0)
            layer.lora_B.weight.copy_(B0)
        self._snapshot = {}

    # ---- evaluation and merging -----------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The rank used outside training and for merging (r unless :meth:`set_rank` changed it)."""
        return next(iter(self.layers.values())).rank if self.layers else self.cfg.r

    def set_rank(self, b: int) -> None:
        """Evaluate and merge at rank b. Raises LorakitError unless 1 ≤ b ≤ r (naming ``--rank``)."""
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.cfg.r:
            raise LorakitError(f"--rank {b!r}: DyLoRA ranks are 1..{self.cfg.r} (r_max of this adapter)")
        for layer in self.layers.values():
            layer.set_rank(b)

    def evaluate(self, run_eval: Callable[[], dict], rank: int | None = None,
                 ranks: str | list[int] | None = None) -> dict:
        """Metrics at the current rank; at ``rank`` (adds ``"rank": b``); or, with ``ranks`` ("1,2,4" or
        "all"), ``{"rank_b": metrics, ...}`` for each b plus the current rank's metrics at top level.
        The current rank is restored afterwards. Raises LorakitError for ranks outside 1..r, or both given."""
        if rank is not None and ranks is not None:
            raise LorakitError("--rank and --ranks: give one of them")
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
