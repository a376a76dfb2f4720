"""Toy data for trainer tests: random token sequences, collated like lorakit.data's bundles."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def pad_collate(examples: list[dict]) -> dict:
    if "input_ids" in examples[0] and isinstance(examples[0]["labels"], int):
        ids = torch.stack([torch.tensor(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([e["labels"] for e in examples])}
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class ToyData:
    train: list
    eval: list
    collate: object = pad_collate
    format: str = "text"
    label_names: list | None = None
    sample_prompts: list = field(default_factory=list)
    sample_references: list = field(default_factory=list)


def toy_data(n_train: int = 24, n_eval: int = 8, vocab: int = 96, seed: int = 0, classes: int | None = None) -> ToyData:
    """Sequences with a learnable pattern (token i+1 follows token i), lengths 6..12."""
    g = torch.Generator().manual_seed(seed)

    def example():
        length = int(torch.randint(6, 13, (1,), generator=g))
        start = int(torch.randint(0, vocab - 13, (1,), generator=g))
        ids = list(range(start, start + length))
        if classes:
            ids = ids[:6]
            return {"input_ids": ids, "labels": start % classes}
        return {"input_ids": ids, "labels": ids}

    return ToyData([example() for _ in range(n_train)], [example() for _ in range(n_eval)],
                   label_names=[str(i) for i in range(classes)] if classes else None)
