"""``lorakit merge``: fold the adapter into the base weights and save a transformers folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console

from lorakit.errors import LorakitError
from lorakit.evaluate import autocast, to_device
from lorakit.session import load_checkpoint_session
from lorakit.train.loop import iterate_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def _logits(model, batches, device) -> list[torch.Tensor]:
    model.eval()
    outs = []
    for batch in batches:
        batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
        with autocast(device):
            outs.append(model(**batch).logits.float().cpu())
    return outs


def merge_run(run: Path, output: Path, dtype: str, console: Console, rank: int | None = None) -> float:
    """Merge a run's adapter into its base, save model + tokenizer to ``output`` atomically.

    Returns the largest absolute logit difference between the adapter model and the merged model on a
    few held-out batches. Raises LorakitError for a bad dtype, an unmergeable method, or an existing
    non-empty ``output``.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise LorakitError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise LorakitError(f"--output {output}: folder exists and is not empty")
    session, path = load_checkpoint_session(run, console)
    method = session.method
    if not method.mergeable:
        raise LorakitError(f"method {method.name} cannot be merged into the base weights")
    if rank is not None:
        if not hasattr(method, "set_rank"):
            raise LorakitError(f"--rank: method {method.name} has a fixed rank")
        method.set_rank(rank)
    batches = list(iterate_batches(session.data.eval, session.data.collate, 4, seed=None))[:2]
    before = _logits(session.model, batches, session.device)
    model = method.merge(session.model, DTYPES.get(dtype))
    after = _logits(model, batches, session.device)
    diff = max((a - b).abs().max().item() for a, b in zip(before, after))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    session.tokenizer.save_pretrained(tmp)
    if output.exists():
        output.rmdir()
    os.replace(tmp, output)
    console.print(f"merged {path} ({method.name}) into {output}")
    return diff
