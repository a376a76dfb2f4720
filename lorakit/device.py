"""Where tensors live: the device lorakit runs on, and moving batches there."""

from __future__ import annotations

import torch


def model_device() -> torch.device:
    """``cuda`` if a GPU is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch``'s tensors on ``device``. To a GPU they go through pinned host memory with
    ``non_blocking=True``: a copy from pageable memory can make the host wait for the GPU's queue."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
