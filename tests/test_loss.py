"""lorakit.loss: the one loss of training and evaluation, and its batch preparation."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit.data import Collator
from lorakit.loss import batch_loss, without_causal_padding_mask


def test_right_padding_mask_is_dropped_with_identical_loss_and_gradients():
    torch.manual_seed(0)
    rows = [{"input_ids": list(range(3, 12)), "labels": list(range(3, 12))},
            {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}]
    batch = Collator(pad_token_id=0)(rows)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    dropped = without_causal_padding_mask(batch)
    assert "attention_mask" not in dropped and "attention_mask" in batch
    models = [LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)),
              GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=4))]
    for model in models:
        model.eval()  # no dropout; gradients still flow
        results = []
        for b in (batch, dropped):
            model.zero_grad()
            loss = model(**b, use_cache=False).loss
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (l1, g1), (l2, g2) = results
        torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
        assert len(g1) == len(g2) > 0
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_masks_are_kept():
    ids = torch.ones(2, 4, dtype=torch.long)
    for mask in ([[0, 1, 1, 1], [1, 1, 1, 1]], [[1, 0, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [1, 1, 1, 1]]):
        batch = {"input_ids": ids, "attention_mask": torch.tensor(mask)}
        assert without_causal_padding_mask(batch) is batch


def test_classification_batches_keep_their_mask():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    assert without_causal_padding_mask(batch, "seq_cls") is batch
    assert "attention_mask" not in without_causal_padding_mask(batch, "causal_lm")


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_one_loss_for_every_implementation_and_transformers():
    """Σ loss of a padded batch: the logits path and the chunked path give transformers' own loss × items."""
    rows = [{"input_ids": list(range(3, 12)), "labels": list(range(3, 12))},
            {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}]
    batch = Collator(pad_token_id=0)(rows)
    model, cpu = _tiny_llama(), torch.device("cpu")
    reference = model(**batch, use_cache=False).loss
    for impl in ("full", "chunked"):
        out = batch_loss(model, batch, "causal_lm", cpu, impl)
        assert out.items == 8 + 2 and out.logits is None
        torch.testing.assert_close(out.summed / out.items, reference, rtol=1e-6, atol=1e-6)
