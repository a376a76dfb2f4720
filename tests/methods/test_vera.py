"""VeRA (Kopiczko et al. 2023): harness checks, the shared projection, and PEFT parity."""

import math
import warnings

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lorakit.config import TrainConfig, recipe_from_dict
from lorakit.storage.checkpoint import adapter_state_dict
from tests.conftest import TINY_MODELS, tiny_inputs
from tests.methods import harness as H

KINDS = ["llama", "gpt2", "bert"]
CFG = {"name": "vera", "r": 4, "lora_dropout": 0.0}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "dense"]}


@pytest.mark.parametrize("kind", KINDS)
def test_noop_at_init(kind):
    H.check_noop_at_init(kind, CFG)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_forward(kind):
    H.check_merge_equals_forward(kind, CFG)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_get_grads(kind):
    H.check_only_adapters_get_grads(kind, CFG, ("vera_lambda_d", "vera_lambda_b"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save", [True, False])
def test_checkpoint_roundtrip(kind, save, tmp_path):
    H.check_checkpoint_roundtrip(kind, {**CFG, "save_projection": save}, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_is_r_plus_out(kind):
    model, method = H.make(kind, CFG)
    expected = sum(4 + layer.out_features for layer in method.layers.values())
    assert H.trainable_count(model) - H.head_count(model) == expected


def test_defaults_and_init():
    model, method = H.make("gpt2", {"name": "vera", "target_modules": ["c_attn", "c_fc"]})
    assert method.cfg.r == 256 and method.cfg.save_projection and method.cfg.projection_prng_key == 0
    proj = method.projection
    # largest in over c_attn (32→96) and c_fc (32→128) is 32; largest out is 128
    assert proj.vera_A.shape == (256, 32) and proj.vera_B.shape == (128, 256)
    assert all(not isinstance(t, torch.nn.Parameter) for t in (proj.vera_A, proj.vera_B))
    assert proj.vera_A.abs().max() <= math.sqrt(6 / 32) and proj.vera_A.abs().max() > 0.9 * math.sqrt(6 / 32)
    assert proj.vera_B.abs().max() <= math.sqrt(6 / 256)
    layer = method.layers["transformer.h.0.attn.c_attn"]
    assert torch.all(layer.vera_lambda_d == 0.1) and torch.all(layer.vera_lambda_b == 0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vera_A" in n or "vera_B" in n for n in names)


def test_lora_alpha_and_rslora_are_set_aside_with_a_warning():
    plain, _ = H.make("llama", CFG)
    for field in ({"lora_alpha": 8}, {"use_rslora": True}):
        cfg = recipe_from_dict({"method": {**CFG, **field}}).method
        assert (cfg.lora_alpha, getattr(cfg, "use_rslora", False)) == (16.0, False)
        [note] = cfg.set_aside_notes()
        assert note.startswith(f"method.{next(iter(field))} = ") and "VeRA has no alpha scaling" in note
        model, _ = H.make("llama", {**CFG, **field})
        torch.testing.assert_close(H.logits(model), H.logits(plain), rtol=0, atol=0)


def test_forward_matches_independent_math_on_conv1d():
    model, method = H.make("gpt2", {**CFG, "target_modules": ["c_attn"]})
    H.randomize_adapters(model)
    layer = method.layers["transformer.h.0.attn.c_attn"]
    assert isinstance(layer.base_layer, Conv1D)
    gen = torch.Generator().manual_seed(0)  # regenerate the projection independently
    a = torch.empty(4, 32).uniform_(-math.sqrt(6 / 32), math.sqrt(6 / 32), generator=gen)
    b = torch.empty(96, 4).uniform_(-math.sqrt(6 / 4), math.sqrt(6 / 4), generator=gen)
    d, lam_b = layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()
    x = torch.randn(5, 32)
    w0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()  # Conv1D: (in, out)
    expected = x @ w0 + b0 + lam_b * ((d * (x @ a.t())) @ b.t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    delta = torch.diag(lam_b) @ b @ torch.diag(d) @ a
    torch.testing.assert_close(layer.merged_layer().weight, w0 + delta.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("save", [True, False])
def test_projection_is_stored_once_or_not_at_all(save):
    model, method = H.make("llama", {**CFG, "save_projection": save})
    assert len(method.layers) == 14
    model.double()  # a dtype/device move keeps the pair shared (it is one module held by every layer)
    ptrs = {layer.vera_projection.vera_A.data_ptr() for layer in method.layers.values()}
    assert len(ptrs) == 1 and method.projection.vera_A.dtype == torch.float64
    state = adapter_state_dict(model)
    assert sum(k.endswith("vera_A") for k in state) == (1 if save else 0)
    assert sum(k.endswith("vera_B") for k in state) == (1 if save else 0)
    assert sum(k.endswith("vera_lambda_d") for k in state) == 14


def test_load_state_dict_regenerates_from_recorded_seed(tmp_path):
    """An unsaved projection comes back from the seed recorded in method.json."""
    from safetensors.torch import save_file

    from lorakit.storage.checkpoint import load_adapter_weights

    cfg = {**CFG, "save_projection": False}
    model, method = H.make("llama", {**cfg, "projection_prng_key": 3})
    H.randomize_adapters(model)
    save_file(adapter_state_dict(model), str(tmp_path / "a.safetensors"))
    fresh, fresh_method = H.make("llama", cfg)
    assert not torch.equal(fresh_method.projection.vera_A, method.projection.vera_A)
    fresh_method.load_state_dict(method.state_dict())
    load_adapter_weights(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(H.logits(fresh), H.logits(model), rtol=0, atol=0)


def test_lora_alpha_set_aside_says_it_is_not_used():
    """VeRA scales by its trained vectors: a recipe's lora_alpha is not used, not replaced by a default."""
    cfg = recipe_from_dict({"method": {**CFG, "lora_alpha": 8}}).method
    assert cfg.set_aside_notes() == ["method.lora_alpha = 8 set aside (VeRA has no alpha scaling: its trainable "
                                     "vectors scale the update, Kopiczko et al. 2023 §3); not used"]


def test_loraplus_is_set_aside_and_saved_defaults_pass():
    cfg = recipe_from_dict({"method": {**CFG, "loraplus_lr_ratio": 16}}).method
    assert cfg.loraplus() is None and "loraplus_lr_ratio = 16 set aside" in cfg.set_aside_notes()[0]
    saved = {"use_rslora": False, "loraplus_lr_ratio": None, "loraplus_lr_embedding": 1e-6}  # older recipe.yaml
    model, method = H.make("llama", {**CFG, **saved})
    groups = method.param_groups(model, TrainConfig(learning_rate=1e-3, weight_decay=0.1))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("no_decay", 1e-3, 0.0)]


# ---- parity with PEFT's VeRA ------------------------------------------------------------------------

def _peft_twin(kind, model, method, save=True):
    from peft import VeraConfig, get_peft_model

    base = TINY_MODELS[kind](0)
    if kind == "bert":
        base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()}, strict=False)
    cfg = VeraConfig(r=4, target_modules=TARGETS[kind], vera_dropout=0.0, projection_prng_key=0,
                     save_projection=save, fan_in_fan_out=kind == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, cfg)
    state = {}
    for name, layer in method.layers.items():
        state[f"base_model.model.{name}.vera_lambda_d.default"] = layer.vera_lambda_d.detach()
        state[f"base_model.model.{name}.vera_lambda_b.default"] = layer.vera_lambda_b.detach()
    assert not peft_model.load_state_dict(state, strict=False).unexpected_keys
    return peft_model


@pytest.mark.parametrize("kind", KINDS)
def test_same_projection_outputs_and_grads_as_peft(kind):
    model, method = H.make(kind, {**CFG, "target_modules": TARGETS[kind]})
    H.randomize_adapters(model)
    peft_model = _peft_twin(kind, model, method)
    vera = peft_model.base_model
    torch.testing.assert_close(method.projection.vera_A, vera.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(method.projection.vera_B, vera.vera_B["default"], rtol=0, atol=0)
    results = []
    for m in (model, peft_model):
        m.train()
        torch.manual_seed(11)  # same base-model dropout masks
        out = m(**tiny_inputs()).logits
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (out, grads), (peft_out, peft_grads) = results
    torch.testing.assert_close(out, peft_out, rtol=1e-5, atol=2e-6)
    for name in method.layers:
        for key in ("vera_lambda_d", "vera_lambda_b"):
            torch.testing.assert_close(grads[f"{name}.{key}"], peft_grads[f"base_model.model.{name}.{key}.default"],
                                       rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_weights_match_peft(kind):
    model, method = H.make(kind, {**CFG, "target_modules": TARGETS[kind]})
    H.randomize_adapters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = _peft_twin(kind, model, method).merge_and_unload()
    H.check_merged_like_peft(method, merged_peft)


def test_resume_continues_identically(tmp_path):
    H.check_resume_continues(tmp_path, {"name": "vera", "r": 4, "save_projection": False})


def test_bf16_base():
    model, method = H.make("llama", {**CFG, "target_modules": ["q_proj"]})
    H.randomize_adapters(model)
    layer = method.layers["model.layers.0.self_attn.q_proj"]
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 32)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer.merged_layer(torch.float32)(x), rtol=2e-2, atol=5e-2)
