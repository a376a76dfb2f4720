"""Packing and batch collation.

Packed rows carry ``position_ids`` that restart at 0 for each example and no ``attention_mask``.
transformers 5 (``masking_utils.find_packed_sequence_indices``) turns such position ids into a
block-diagonal causal mask for sdpa, eager and flex attention (and varlen boundaries for flash
attention) — but only when the 2-D ``attention_mask`` is None AND no cache is passed: the model must
be called with ``use_cache=False`` (or ``config.use_cache = False``), otherwise a ``DynamicCache`` is
created and attention silently crosses examples.
"""

from __future__ import annotations

import datasets
import torch

from lorakit.data.raw import map_batches

IGNORE = -100


def pack(ds: datasets.Dataset, max_len: int) -> datasets.Dataset:
    """Greedily concatenate tokenized examples (in order) into rows of at most ``max_len`` tokens.

    Each row gets ``position_ids`` restarting at 0 per example; the label of each example's first
    token is -100 (it would otherwise be predicted from the previous example's last token).
    """

    def pack_batch(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []

        def flush() -> None:
            if ids:
                out["input_ids"].append(list(ids))
                out["labels"].append(list(labels))
                out["position_ids"].append(list(pos))
                ids.clear(), labels.clear(), pos.clear()

        for ex_ids, ex_labels in zip(batch["input_ids"], batch["labels"]):
            ex_ids, ex_labels = ex_ids[:max_len], ex_labels[:max_len]
            if not ex_ids:
                continue
            if len(ids) + len(ex_ids) > max_len:
                flush()
            ids.extend(ex_ids)
            labels.extend([IGNORE] + list(ex_labels[1:]))
            pos.extend(range(len(ex_ids)))
        flush()
        return out

    return map_batches(ds, pack_batch, batch_size=10_000)


class Collator:
    """Right-pads a list of tokenized rows into tensors (a class, so DataLoader workers can pickle it).

    Causal LM rows → ``input_ids``, ``attention_mask``, ``labels`` (padding -100). Packed rows (with
    ``position_ids``) → ``input_ids``, ``position_ids``, ``labels`` and no ``attention_mask``: the padding
    of a packed row gets positions 0, 1, ... so it forms its own block that no real token attends to.
    Classification rows → ``input_ids``, ``attention_mask`` and ``labels`` as a LongTensor of shape [B].
    ``pad_to_multiple_of``: the padded width is rounded up to a multiple of it (few distinct shapes, for
    CUDA graphs), but not past ``max_width`` (the longest row allowed, ``data.max_seq_length``) unless a
    row is longer; 1 pads to the longest row only.
    """

    def __init__(self, pad_token_id: int, classification: bool = False, pad_to_multiple_of: int = 1,
                 max_width: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.classification = classification
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_width = max_width

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n, longest = len(features), max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_width is not None:
            width = max(longest, min(width, self.max_width))
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        lengths = [len(f["input_ids"]) for f in features]
        for i, f in enumerate(features):
            ids[i, : lengths[i]] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        if self.classification:
            mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
            labels = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : lengths[i]] = torch.as_tensor(f["labels"], dtype=torch.long)
        if "position_ids" not in features[0]:
            mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pos = torch.arange(width).repeat(n, 1)
        for i, f in enumerate(features):
            pos[i, : lengths[i]] = torch.as_tensor(f["position_ids"], dtype=torch.long)
            pos[i, lengths[i]:] = torch.arange(width - lengths[i])
        return {"input_ids": ids, "position_ids": pos, "labels": labels}
