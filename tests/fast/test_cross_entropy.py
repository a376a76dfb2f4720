"""Chunked linear + cross-entropy against full-logit cross-entropy (fp64 reference) and transformers' loss."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.fast import cross_entropy as ce
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama
from tests.methods import harness as H


def reference(hidden, weight, labels):
    """Σ CE over rows with label ≠ -100, in fp64 on full logits."""
    return F.cross_entropy(hidden.double() @ weight.double().t(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_value_and_gradient_match_full_logits(monkeypatch, dtype, tol):
    monkeypatch.setattr(ce, "CHUNK_BYTES", 4 * 50 * 64)  # 64-row chunks: 150 rows → 3 chunks, one partial
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 24, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(50, 24, generator=g).to(dtype)
    labels = torch.randint(0, 50, (150,), generator=g)
    labels[::7] = -100
    loss = ce.linear_cross_entropy(hidden, weight, labels)
    loss.backward(torch.tensor(0.5))
    h64 = hidden.detach().double().requires_grad_()
    ref = reference(h64, weight, labels)
    (0.5 * ref).backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    err = (hidden.grad.double() - h64.grad).norm() / h64.grad.norm()
    assert err < tol
    assert hidden.grad[::7].abs().max() == 0  # ignored rows get no gradient


def test_no_gradient_when_not_needed():
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (10,))
    with torch.no_grad():
        assert ce.linear_cross_entropy(hidden, weight, labels).item() == pytest.approx(reference(hidden, weight, labels).item(), rel=1e-5)


def test_chunk_rows():
    assert ce.chunk_rows(151936, 8192) % 64 == 0 and 4 * 151936 * ce.chunk_rows(151936, 8192) <= ce.CHUNK_BYTES
    assert ce.chunk_rows(100, 10) == 10


def lm_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # padding
    labels[2, 6:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_loss_equals_transformers_loss(kind):
    model, _ = H.make(kind, {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})
    H.randomize_adapters(model)
    batch = lm_batch()
    items = int((batch["labels"][:, 1:] != -100).sum())
    ours = ce.causal_lm_loss(model, batch, items + 5)
    ours.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(**batch, num_items_in_batch=items + 5, use_cache=False).loss
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


def frozen(model):
    return model.requires_grad_(False)


def test_refuses_what_it_cannot_fuse():
    bert = frozen(tiny_bert())
    assert ce.fused_head(bert) is None
    llama = tiny_llama()
    assert ce.fused_head(llama) is None  # full fine-tuning trains the (tied) head
    frozen(llama)
    assert ce.fused_head(llama) is llama.lm_head
    llama.config.final_logit_softcapping = 30.0  # soft-capped logits: transformers' path
    assert ce.fused_head(llama) is None
    gpt2 = frozen(tiny_gpt2())
    assert ce.fused_head(gpt2) is gpt2.lm_head
    assert ce.causal_lm_loss(bert, lm_batch(), 1) is None


def test_adapted_head_uses_the_full_path():
    model, _ = H.make("llama", {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["lm_head", "q_proj"]})
    assert ce.fused_head(model) is None


def test_evaluation_without_full_logits_gives_the_same_metrics():
    from lorakit.evaluate import evaluate_model

    model, _ = H.make("llama", {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    H.randomize_adapters(model)
    batches = [lm_batch(1), lm_batch(2)]
    full = evaluate_model(model, batches, "causal_lm", torch.device("cpu"), "full")
    fast = evaluate_model(model, batches, "causal_lm", torch.device("cpu"), "chunked")
    assert fast["eval_tokens"] == full["eval_tokens"]
    assert fast["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
