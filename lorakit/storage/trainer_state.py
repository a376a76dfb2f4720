"""The trainer's part of a training checkpoint: ``trainer_state.pt`` (optimizer, scheduler and RNG state,
saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``: tensors and plain data only,
no code runs) and ``trainer.json`` (the step reached, the number of processes, the best-evaluation
tracker's state). Written into the checkpoint's temporary folder by
:func:`lorakit.storage.checkpoint.save_checkpoint`; everything read is checked, and a damaged file is
one :class:`~lorakit.errors.LorakitError` naming it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lorakit import trust
from lorakit.errors import LorakitError


def write(folder: Path, optimizer, scheduler, step: int | None, world_size: int = 1, best: dict | None = None,
          rank_rng: dict[str, torch.Tensor] | None = None) -> None:
    """``trainer_state.pt`` and ``trainer.json`` in ``folder``: ``optimizer`` (the optimizer or its whole
    state dict), the scheduler's state, this process's RNG states (torch, Python, CUDA) and ``rank_rng``
    (every rank's, :meth:`lorakit.world.World.gather_rng`) as ``rng["ranks"]``; the step, ``world_size``
    and ``best`` (:class:`lorakit.train.keep.BestTracker` state)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if rank_rng is not None:
        rng["ranks"] = rank_rng
    optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng},
               Path(folder) / "trainer_state.pt")
    best_state = {} if best is None else {"best": best}
    (Path(folder) / "trainer.json").write_text(json.dumps({"step": step, "world_size": world_size, **best_state}))


def load(path: Path, mmap: bool = False) -> dict:
    """Optimizer / scheduler / RNG state of a training checkpoint (``weights_only=True``: no code runs;
    ``mmap``: tensors mapped, not read, to check a checkpoint cheaply).

    Raises:
        LorakitError: ``trainer_state.pt`` is missing, damaged, or holds anything but tensors and plain data.
    """
    file = Path(path) / "trainer_state.pt"
    try:
        state = torch.load(file, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as err:  # noqa: BLE001 - unpickling refused, truncated zip, missing file...
        raise LorakitError(f"{file}: not a valid lorakit checkpoint file ({type(err).__name__}; "
                           "lorakit loads only tensors and plain data from it)") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise LorakitError(f"{file}: not a valid lorakit checkpoint file (no optimizer / scheduler / rng state)")
    _check_rng(state["rng"], file)
    return state


def _check_rng(rng: object, file: Path) -> None:
    """Refuse RNG states torch would reject with a traceback: ``torch`` a uint8 vector of this torch's
    length, ``ranks`` (several processes) uint8 rows of the same lengths."""
    n = torch.get_rng_state().numel()

    def states(x: object, dims: int) -> bool:
        return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == dims and x.shape[-1] > 0

    ranks = rng.get("ranks") if isinstance(rng, dict) else None
    ok = (isinstance(rng, dict) and states(rng.get("torch"), 1) and rng["torch"].numel() == n
          and "python" in rng
          and (ranks is None or (isinstance(ranks, dict) and states(ranks.get("torch"), 2)
                                 and ranks["torch"].shape[1] == n
                                 and all(states(v, 2) for v in ranks.values()))))
    if ok:
        try:  # Python's own check of its state, on a throwaway generator
            random.Random().setstate(_python_state(rng["python"]))
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok:
        raise LorakitError(f"{file}: not a valid lorakit checkpoint file (rng state)")


def _python_state(saved) -> tuple:
    """``random.getstate()`` as stored (its inner tuple may come back as a list)."""
    return tuple(tuple(x) if isinstance(x, list) else x for x in saved)


def check(path: Path) -> int:
    """Check, without loading a model, every file ``--resume`` reads from a training checkpoint (the
    adapter's header, the trainer state, the step). Returns the step. Raises LorakitError naming the file."""
    trust.adapter_metadata(Path(path) / trust.ADAPTER_FILE)
    load(path, mmap=True)
    return read_step(path)


def read_step(path: Path) -> int:
    """The step a training checkpoint was written at (``trainer.json``). Raises LorakitError if invalid."""
    data = trust.read_json(Path(path) / "trainer.json", "lorakit checkpoint file")
    step = data.get("step") if isinstance(data, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise LorakitError(f"{Path(path) / 'trainer.json'}: not a valid lorakit checkpoint file (no step)")
    return step


def read_best(path: Path) -> dict | None:
    """The best-evaluation tracker's state a training checkpoint stored (``trainer.json``), or None
    (written before it was recorded). Checked by :meth:`lorakit.train.keep.BestTracker.load_state_dict`."""
    data = trust.read_json(Path(path) / "trainer.json", "lorakit checkpoint file")
    return data.get("best") if isinstance(data, dict) else None


def read_world_size(path: Path) -> int:
    """The number of processes that wrote a training checkpoint (``trainer.json``; 1 when not recorded).
    Raises LorakitError if invalid."""
    data = trust.read_json(Path(path) / "trainer.json", "lorakit checkpoint file")
    size = data.get("world_size", 1) if isinstance(data, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise LorakitError(f"{Path(path) / 'trainer.json'}: not a valid lorakit checkpoint file (world_size)")
    return size


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_python_state(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
