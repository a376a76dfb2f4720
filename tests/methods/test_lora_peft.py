"""lorakit LoRA / rsLoRA against PEFT's LoRA on the same tiny bases with the same A and B (fp32)."""

import copy

import pytest
import torch

from tests.conftest import TINY_MODELS, tiny_inputs
from tests.methods import harness as H

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: PEFT needs fan_in_fan_out=True
    "bert": ["query", "key", "value", "dense"],  # also the pooler's dense, in both libraries
}


def peft_key(name: str) -> str:
    """PEFT's live parameter name → lorakit's (``base_model.model.X.lora_A.default.weight`` → ``X.lora_A.weight``)."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def pair(kind: str, rslora: bool):
    """(lorakit model, method, PEFT model) on identical bases, PEFT holding lorakit's random A and B."""
    from peft import LoraConfig, get_peft_model

    model, method = H.make(kind, {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                  "target_modules": TARGETS[kind], "use_rslora": rslora})
    H.randomize_adapters(model)
    peft = get_peft_model(TINY_MODELS[kind](0), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind], use_rslora=rslora,
        fan_in_fan_out=kind == "gpt2"))
    ours = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in peft.named_parameters():
            key = peft_key(name)
            if ".lora_" in name:
                param.copy_(ours[key])
                copied += 1
            elif key.startswith(("classifier", "score")):  # the head lorakit trains: same values
                param.copy_(ours[key])
    assert copied == 2 * len(method.layers) > 0
    return model, method, peft


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("rslora", [False, True])
def test_same_logits_gradients_and_merge_as_peft(kind, rslora):
    model, method, peft = pair(kind, rslora)
    scaling = next(iter(method.layers.values())).scaling
    assert scaling == pytest.approx(8 / 2 if rslora else 8 / 4)
    peft_layer = peft.get_submodule("base_model.model." + next(iter(method.layers)))
    assert peft_layer.scaling["default"] == pytest.approx(scaling)

    inputs = tiny_inputs()
    ours, theirs = model(**inputs).logits, peft(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    target = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    ((ours - target) ** 2).mean().backward()
    ((theirs - target) ** 2).mean().backward()
    grads = {peft_key(n): p.grad for n, p in peft.named_parameters() if ".lora_" in n}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            assert param.grad.abs().sum() > 0
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-7)

    merged = method.merge(copy.deepcopy(model)).state_dict()
    reference = peft.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)
