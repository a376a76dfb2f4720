"""Training on several processes with ``torch.distributed`` (launched by ``torchrun``): DDP and FSDP2.

The trainer and the method hooks learn the world they run in from a :class:`lorakit.world.World`
handed to them (never from the environment).

Same numbers at any world size (CPU/gloo, fp32, no dropout: within 1e-4 of one process at the
global batch; ``tests/train/test_distributed.py``):
  - the batches: global micro-batch k (``train.batch_size`` × world size rows, in an order that
    depends only on the seed and epoch) is split into world-size contiguous shares, one per rank;
    a rank whose share is empty (the last, short batch) runs a *blank* batch — one row whose labels
    are all -100 — so every rank runs the same forwards and collectives, with zero weight
    (:mod:`lorakit.data.batches`);
  - the loss: each rank divides its share's summed loss by the token count of the whole step
    (all-reduced), and the gradients are summed over ranks (DDP and FSDP average, so the loss is
    scaled by the world size before backward);
  - evaluation: each rank evaluates its share of every global eval batch; loss sums, counts and the
    classification confusion matrix are all-reduced before the metrics are formed.

``train.distributed`` (auto | ddp | fsdp): DDP replicates the model and all-reduces the adapter
gradients; FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every decoder layer and the root,
frozen base and adapters alike, and all-gathers each layer for its forward and backward. Methods
that keep state across steps outside the forward on whole tensors (``Method.shardable`` False:
DyLoRA's rank-slice restore, LoRA-drop's pairs shared across layers) run under DDP instead, and the
run says so in one line at start.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from lorakit.world import World, full_tensor


def resolve_mode(world: World, choice: str, method) -> tuple[World, str | None]:
    """(world with its mode, a one-line note or None) for ``train.distributed`` = auto | ddp | fsdp.

    auto: DDP on several processes, nothing on one. fsdp: FSDP2, also on one process (a process group of
    one is created); a method that cannot run sharded (``Method.shardable`` False) runs DDP instead.
    """
    if choice == "fsdp" and not getattr(method, "shardable", True):
        note = (f"train.distributed fsdp: {method.name} cannot run sharded ({method.unsharded_reason}); "
                f"running {'DDP' if world.size > 1 else 'on one process'} instead")
        choice = "ddp"
        return _with_mode(world, choice), note
    return _with_mode(world, choice), None


def _with_mode(world: World, choice: str) -> World:
    if choice == "fsdp":
        if not dist.is_initialized():  # one process, no torchrun: a group of one for fully_shard
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "cpu:gloo,cuda:nccl",
                                    store=dist.HashStore(), rank=0, world_size=1)
        return World(world.rank, world.size, world.local_rank, "fsdp")
    return World(world.rank, world.size, world.local_rank, "ddp" if world.size > 1 else "single")


# ---- wrapping ---------------------------------------------------------------------------------------
def wrap_ddp(module: nn.Module) -> nn.Module:
    """``module`` under DDP (gradients of trainable parameters all-reduced, averaged). Every rank built
    the same model from the same seed; adapters are broadcast from rank 0 beforehand
    (:func:`sync_adapters`), so DDP's own sync of the whole (frozen) model is skipped. No
    ``device_ids``: DDP would move the CPU batch to the GPU itself, before the loss reads its labels."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=None, forward_sync_buffers=False, init_sync=False)


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Trainable parameters and the adapter layers' own buffers (not the frozen base's), each once."""
    from lorakit.methods import AdapterLayer

    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name, buf in module.named_buffers():
                if not name.startswith("base_layer.") and buf is not None:
                    seen.setdefault(id(buf), buf)
    for p in model.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def sync_adapters(model: nn.Module, world: World) -> None:
    """Every rank's adapters set to rank 0's (after a ``prepare`` hook whose random draws may differ)."""
    world.broadcast_tensors(adapter_tensors(model))


def wrap_fsdp(model: nn.Module, layers: nn.ModuleList | None) -> None:
    """FSDP2 in place: each decoder layer its own group, then the root (embeddings, head, the rest).
    Parameters become ``DTensor`` shards; the forward all-gathers a layer, the backward reduce-scatters
    its gradients (averaged over ranks)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers or []:
        fully_shard(layer)
    fully_shard(model)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded gradients: the total norm is reduced over
    ranks first (torch's own function would clip by each rank's partial norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = full_tensor(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ---- optimizer state: one whole, index-keyed format at every world size ------------------------------
def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (collective), in the
    format a single process writes, so any world size can load it."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new ones
    state["state"] = {index: {key: full_tensor(value) if isinstance(value, torch.Tensor) else value
                              for key, value in values.items()}
                      for index, values in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state; under FSDP each tensor shaped like its parameter is re-sharded as
    the parameter is (``distribute_tensor``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    optimizer.load_state_dict(state)
    for p, values in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                values[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole (unsharded) tensors, e.g. a checkpoint's adapter, into a model sharded by FSDP2: each
    one is sharded as its parameter is (``set_model_state_dict`` with ``full_state_dict``; every rank
    passes the same tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def gradient_sync(engine: nn.Module, model: nn.Module, world: World, sync: bool) -> Iterator[None]:
    """Reduce gradients over ranks in this backward only if ``sync`` (the step's last micro-batch):
    DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``; nothing on one process."""
    if world.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(engine, "no_sync"):
        with engine.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def unsharded(model: nn.Module, world: World) -> Iterator[None]:
    """Under FSDP, every group's parameters gathered whole for the block (a collective), then sharded
    again; otherwise nothing."""
    if world.mode != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
