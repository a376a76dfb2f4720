"""lorakit.data.collate: padding, packing, and packed rows that do not attend across examples."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.data import Collator, load_raw, pack, tokenize
from tests.helpers_data import CHAT, write_jsonl, cfg, tiny_tokenizer  # noqa: F401 - fixture


def test_causal_collate_right_pads():
    collate = Collator(pad_token_id=9)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


# ---- packing -------------------------------------------------------------------------------------
def test_packing_layout():
    examples = [list(range(10 * k + 1, 10 * k + 1 + n)) for k, n in enumerate([3, 4, 2, 5, 6])]
    ds = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    packed = pack(ds, max_len=8)
    assert packed["input_ids"] == [examples[0] + examples[1], examples[2] + examples[3], examples[4]]
    assert packed["position_ids"][0] == [0, 1, 2, 0, 1, 2, 3]
    assert packed["labels"][1] == [-100, 22, -100, 32, 33, 34, 35]
    batch = Collator(pad_token_id=0)([packed[0], packed[2]])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0]]
    assert batch["labels"][1].tolist() == [-100, 42, 43, 44, 45, 46, -100]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_matches_unpacked_logits(tmp_path, tiny_tokenizer, attn):
    """transformers 5 derives a block-diagonal causal mask from restarting position_ids (use_cache=False)."""
    raw = load_raw(cfg(write_jsonl(tmp_path / "c.jsonl", CHAT), eval_fraction=0.2), "causal_lm", 0)
    bundle = tokenize(raw, cfg("x", packing=True, max_seq_length=128), tiny_tokenizer, "causal_lm")
    plain = tokenize(raw, cfg("x", max_seq_length=128), tiny_tokenizer, "causal_lm")
    assert bundle.packed and len(bundle.train) < len(plain.train)
    assert sum(len(r["input_ids"]) for r in bundle.train) == sum(len(r["input_ids"]) for r in plain.train)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
    )).eval()
    rows = list(bundle.train)  # all packed rows in one batch: rows of different lengths get padding
    batch = bundle.collate(rows)
    assert max(r["position_ids"].count(0) for r in rows) >= 2  # some row holds several examples
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for b, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            for s, e in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][s:e]])).logits[0]
                torch.testing.assert_close(packed_logits[b, s:e], alone, atol=1e-5, rtol=1e-4)
        # the check is sensitive: with a plain 2-D mask (no block-diagonal) later examples see earlier ones
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        assert not torch.allclose(leaky, packed_logits, atol=1e-3)



def test_collator_pads_to_a_multiple():
    from lorakit.data import Collator

    rows = [{"input_ids": [5] * 3, "labels": [5] * 3}, {"input_ids": [6] * 70, "labels": [6] * 70}]
    batch = Collator(0, pad_to_multiple_of=64)(rows)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum().item() == 73 and (batch["labels"][0, 3:] == -100).all()
    assert Collator(0)(rows)["input_ids"].shape == (2, 70)
    assert Collator(0, pad_to_multiple_of=64, max_width=100)(rows)["input_ids"].shape == (2, 100)  # not past max
