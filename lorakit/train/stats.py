"""A training step's loss and gradient norm, read from the device one step late.

Reading a CUDA tensor's value (``.item()``) waits until the GPU has finished everything queued before
it, and the GPU then idles until the host queues the next work. The trainer therefore keeps each step's
loss and gradient norm on the device (:class:`StepStats`) and reads step k after step k + 1 is queued,
when step k is long done. A non-finite step must still not reach the weights: torch's fused AdamW takes
a ``found_inf`` flag (the mechanism ``torch.amp.GradScaler`` uses) and skips the whole update on the
device, moment and step counts included; other optimizers read the flag before the update (one sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError


def skips_nonfinite_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW (the trainer's optimizer on CUDA), whose ``step`` honours
    ``optimizer.found_inf``."""
    return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)


@dataclass
class StepStats:
    """Optimizer step ``step`` (1-based): ``loss`` 0-d fp32 (summed over micro-batches, each already
    divided by the step's loss items), ``grad_norm`` 0-d (the total norm before clipping) or None,
    ``lr`` (group 0's learning rate after the scheduler step), ``tokens``, ``started``. Tensors may still be on the device."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor | None = None
    lr: float | None = None
    tokens: int = 0  # input tokens of the step, padding excluded (for tokens/s)
    started: float = 0.0  # time.perf_counter() when the step began

    def nonfinite(self) -> torch.Tensor:
        """0-d fp32 on the loss's device: 1.0 when the loss or the gradient norm is inf/NaN."""
        bad = ~torch.isfinite(self.loss)
        if self.grad_norm is not None:
            bad = bad | ~torch.isfinite(self.grad_norm)
        return bad.float().reshape(())

    def read(self) -> tuple[float, float | None]:
        """(loss, grad_norm) as Python floats (one device-to-host copy; waits for the step).

        Raises LorakitError naming the step when either is not finite."""
        if self.grad_norm is None:
            loss, norm = self.loss.item(), None
        else:
            loss, norm = torch.stack([self.loss.float(), self.grad_norm.float()]).tolist()
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {norm}"
            raise LorakitError(
                f"{what} at step {self.step}; lower train.learning_rate, or use model.dtype "
                "bfloat16/float32 (float16 overflows easily); that update was not applied and the last "
                "checkpoint is intact (on GPU the step after it may already have run; it is not saved)"
            )
        return loss, norm
