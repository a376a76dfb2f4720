import torch

from lorakit.data.batches import Blank
from lorakit.train.steplog import count_tokens


def test_tokens_exclude_padding_and_a_blank_has_none():
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    assert count_tokens(batch) == 4
    assert count_tokens({"input_ids": torch.zeros(2, 4, dtype=torch.long)}) == 8
    assert count_tokens(Blank(batch)) == 0
