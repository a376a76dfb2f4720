import pytest
import torch

from tests.methods import harness as H

KINDS = ["llama", "gpt2", "bert"]
CFG = {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize("kind", KINDS)
def test_noop_at_init(kind):
    H.check_noop_at_init(kind, CFG)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_forward(kind, rslora):
    H.check_merge_equals_forward(kind, {**CFG, "use_rslora": rslora})


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_get_grads(kind):
    H.check_only_adapters_get_grads(kind, CFG, ("lora_A", "lora_B"))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_roundtrip(kind, tmp_path):
    H.check_checkpoint_roundtrip(kind, CFG, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_is_r_times_in_plus_out(kind):
    model, method = H.make(kind, CFG)
    expected = sum(CFG["r"] * (layer.in_features + layer.out_features) for layer in method.layers.values())
    assert H.trainable_count(model) - H.head_count(model) == expected


def test_scaling_and_rslora():
    _, method = H.make("llama", {**CFG, "r": 16, "lora_alpha": 32})
    assert next(iter(method.layers.values())).scaling == pytest.approx(2.0)
    _, method = H.make("llama", {**CFG, "r": 16, "lora_alpha": 32, "use_rslora": True})
    assert next(iter(method.layers.values())).scaling == pytest.approx(8.0)


def test_gpt2_conv1d_merge_layout():
    """Conv1D stores (in, out): the merged weight must be W0 + (sBA)^T in that layout."""
    model, method = H.make("gpt2", {**CFG, "target_modules": ["c_attn"]})
    H.randomize_adapters(model)
    layer = method.layers["transformer.h.0.attn.c_attn"]
    merged = layer.merged_layer()
    assert merged.weight.shape == layer.base_layer.weight.shape
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-5)


def test_dropout_only_on_branch():
    """With dropout, the base path is untouched: B = 0 gives the base output exactly in train mode."""
    model, _ = H.make("llama", {**CFG, "lora_dropout": 0.5})
    base = H.TINY_MODELS["llama"](0)
    model.train()
    torch.testing.assert_close(H.logits(model), H.logits(base), rtol=0, atol=1e-6)
