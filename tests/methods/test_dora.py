"""DoRA (Liu et al. 2024): harness checks, the fast row norm against the naive one, and PEFT parity."""

import warnings

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lorakit.methods.config import LoraConfig
from lorakit.methods.dora import DoraLayer
from tests.conftest import TINY_MODELS, tiny_inputs
from tests.methods import harness as H

KINDS = ["llama", "gpt2", "bert"]
CFG = {"name": "dora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "dense"]}


@pytest.mark.parametrize("kind", KINDS)
def test_noop_at_init(kind):
    H.check_noop_at_init(kind, CFG)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_forward(kind):
    H.check_merge_equals_forward(kind, CFG)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_get_grads(kind):
    H.check_only_adapters_get_grads(kind, CFG, ("lora_A", "lora_B", "magnitude"))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_roundtrip(kind, tmp_path):
    H.check_checkpoint_roundtrip(kind, CFG, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count(kind):
    model, method = H.make(kind, CFG)
    expected = sum(4 * (l.in_features + l.out_features) + l.out_features for l in method.layers.values())
    assert H.trainable_count(model) - H.head_count(model) == expected


def _layer(base):
    layer = DoraLayer(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():  # make s·BA as large as W0 so the cross terms matter
        layer.lora_B.weight.normal_(0, 1.0)
        layer.base_layer.bias.normal_(0, 3.0)
    return layer


def _w0(layer):  # (out, in) fp64, independent of lorakit's helpers
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


@pytest.mark.parametrize("make_base", [lambda: torch.nn.Linear(48, 40), lambda: Conv1D(40, 48)], ids=["linear", "conv1d"])
def test_fast_row_norm_equals_naive(make_base):
    torch.manual_seed(0)
    layer = _layer(make_base())
    w0 = _w0(layer)
    assert w0.shape == (40, 48)
    torch.testing.assert_close(layer.magnitude.double(), w0.norm(dim=1), rtol=1e-6, atol=0)  # init: ‖W0‖_row
    naive = (w0 + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).norm(dim=1)
    assert (naive / w0.norm(dim=1) - 1).abs().max() > 0.5  # the adapter really changes the norms
    fast = layer.weight_norm()
    assert fast.dtype == torch.float32 and not fast.requires_grad
    torch.testing.assert_close(fast.double(), naive, rtol=2e-6, atol=0)


def test_forward_and_merge_match_independent_math_on_conv1d():
    torch.manual_seed(1)
    layer = _layer(Conv1D(40, 48))
    with torch.no_grad():
        layer.magnitude.mul_(torch.rand(40) + 0.5)
    w0, b = _w0(layer), layer.base_layer.bias.double()
    v = w0 + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    w_merged = (layer.magnitude.double() / v.norm(dim=1)).unsqueeze(1) * v
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x).double(), x.double() @ w_merged.t() + b, rtol=1e-5, atol=1e-5)
    merged = layer.merged_layer()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (48, 40)
    torch.testing.assert_close(merged.weight.double(), w_merged.t(), rtol=1e-5, atol=1e-6)


def test_dropout_path_formula():
    """In training with dropout: h = W0x + b + (m/n − 1)⊙(W0x̃) + (m/n)⊙(s·BAx̃), x̃ the same mask."""
    torch.manual_seed(2)
    layer = DoraLayer(torch.nn.Linear(24, 16), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.magnitude.mul_(1.7)
    layer.train()
    x = torch.randn(6, 24)
    torch.manual_seed(9)
    got = layer(x)
    torch.manual_seed(9)
    x_d = torch.nn.functional.dropout(x, 0.5, training=True)
    w0, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    ba = layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    scale = layer.magnitude.detach() / (w0 + ba).norm(dim=1)
    expected = x @ w0.t() + b + (scale - 1) * (x_d @ w0.t()) + scale * (x_d @ ba.t())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_four_bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 64)
    q = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = q.to("cpu")  # quantizes
        layer = _layer(q)
        w0 = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double()
        naive = (w0 + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).norm(dim=1)
        torch.testing.assert_close(layer.weight_norm().double(), naive, rtol=2e-6, atol=0)
        torch.testing.assert_close(layer.magnitude.double(), w0.norm(dim=1), rtol=1e-6, atol=0)
        x = torch.randn(3, 128)
        torch.testing.assert_close(layer(x), layer.merged_layer()(x), rtol=1e-4, atol=1e-4)


def test_norms_follow_a_reloaded_base():
    """The cached ‖w_i‖² is recomputed when a load_state_dict writes the base weight."""
    model, method = H.make("llama", CFG)
    new_weight = TINY_MODELS["llama"](7).model.layers[0].self_attn.q_proj.weight.detach()
    model.load_state_dict({"model.layers.0.self_attn.q_proj.base_layer.weight": new_weight}, strict=False)
    layer = method.layers["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.weight_norm(), new_weight.norm(dim=1))  # B = 0: n = ‖W0‖_row


# ---- parity with PEFT's LoRA(use_dora=True) ---------------------------------------------------------

def _peft_twin(kind, model, method, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    base = TINY_MODELS[kind](0)
    if kind == "bert":  # the classification head is trainable: copy lorakit's
        base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()}, strict=False)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[kind], use_dora=True,
                     fan_in_fan_out=kind == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, cfg)
    state = {}
    for name, layer in method.layers.items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = layer.lora_A.weight.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = layer.lora_B.weight.detach()
        state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"] = layer.magnitude.detach()
    assert not peft_model.load_state_dict(state, strict=False).unexpected_keys
    return peft_model


def _out_and_grads(model, train: bool):
    model.train(train)
    model.zero_grad()
    torch.manual_seed(11)  # same dropout masks in both models (same draw order)
    out = model(**tiny_inputs()).logits
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["eval", "train", "train-dropout"])
def test_same_outputs_and_grads_as_peft(kind, mode):
    dropout = 0.3 if mode == "train-dropout" else 0.0
    model, method = H.make(kind, {**CFG, "lora_dropout": dropout, "target_modules": TARGETS[kind]})
    H.randomize_adapters(model)
    peft_model = _peft_twin(kind, model, method, dropout)
    out, grads = _out_and_grads(model, mode != "eval")
    peft_out, peft_grads = _out_and_grads(peft_model, mode != "eval")
    torch.testing.assert_close(out, peft_out, rtol=1e-5, atol=2e-6)
    for name in method.layers:
        for ours, theirs in (("lora_A.weight", "lora_A.default.weight"), ("lora_B.weight", "lora_B.default.weight"),
                             ("magnitude", "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(grads[f"{name}.{ours}"], peft_grads[f"base_model.model.{name}.{theirs}"],
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
    H.check_resume_continues(tmp_path, {"name": "dora"})


def test_bf16_base_and_autocast_keep_the_norm_in_fp32():
    torch.manual_seed(4)
    layer = _layer(torch.nn.Linear(48, 40))
    exact = layer.weight_norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer.weight_norm(), exact, rtol=0, atol=0)
        assert layer(torch.randn(3, 48)).dtype == torch.bfloat16
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 48)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.weight_norm().dtype == torch.float32
    torch.testing.assert_close(out.float(), layer.merged_layer(torch.float32)(x), rtol=2e-2, atol=5e-2)
