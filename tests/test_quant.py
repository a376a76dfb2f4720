"""k-bit bases (lorakit.quant, QLoRA §3): the NF4 settings, dequantization checked against independent
math, preparation, dequantizing a model for saving, and the optimizer choice. bitsandbytes runs on CPU."""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from lorakit import quant
from lorakit.config import ModelConfig
from lorakit.methods.base import base_weight
from lorakit.models import _quantization_config, load_model
from tests.conftest import tiny_bert, tiny_inputs, tiny_llama

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(94)]  # 96 = the tiny models' vocabulary


def save_tiny(folder, kind: str = "llama", texts: int = 0):
    """Save a tiny model (tests/conftest.py) with a word-level tokenizer (w0 … w93) to ``folder``;
    with ``texts`` > 0 also ``data.jsonl``: runs of consecutive words (w5 w6 w7 …), a learnable pattern."""
    model = tiny_bert() if kind == "bert" else tiny_llama()
    model.save_pretrained(folder)
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    with open(folder / "data.jsonl", "w") as handle:
        for _ in range(texts):
            start, n = int(torch.randint(0, 80, (1,), generator=g)), int(torch.randint(6, 12, (1,), generator=g))
            handle.write(json.dumps({"text": " ".join(f"w{j}" for j in range(start, start + n))}) + "\n")
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_q")
    save_tiny(path)
    return path


def quantized(folder, q="nf4", **kw):
    return load_model(ModelConfig(name_or_path=str(folder), quantization=q, **kw))


def test_nf4_settings_are_the_papers(folder):
    """QLoRA §3 / METHODS.md §4: NF4, double quantization, blocks of 64 and 256, fp32 compute on CPU."""
    cfg = _quantization_config(ModelConfig(quantization="nf4"))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert _quantization_config(ModelConfig(quantization="int8")).load_in_8bit
    assert _quantization_config(ModelConfig(quantization="nf4", task="seq_cls")).llm_int8_skip_modules == ["classifier", "score"]
    state = quantized(folder).model.layers[0].mlp.down_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256


def test_nf4_levels_are_normal_quantiles(folder):
    """NF4 (QLoRA §3, Appendix E): 8 positive quantiles of N(0,1) over [0.5, δ], 7 negative, and an exact
    zero, normalized to [-1, 1]; δ = 0.9677 (½(1−1/(2·15) + 1−1/(2·16))), as the reference construction."""
    normal = torch.distributions.Normal(0.0, 1.0)
    delta = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    pos = normal.icdf(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    code = quantized(folder).model.layers[0].mlp.down_proj.weight.quant_state.code
    torch.testing.assert_close(code.double(), levels / levels.max(), rtol=0, atol=1e-4)


def manual_dequant_nf4(layer) -> torch.Tensor:
    """dequant(Wq) from the raw storage: two 4-bit codes per byte (high nibble first), one absmax per 64
    weights, each absmax stored as an 8-bit code × its block-of-256 scale + the mean offset."""
    state = layer.weight.quant_state
    packed = layer.weight.data.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    s2 = state.state2
    absmax = s2.code[state.absmax.long()] * s2.absmax.repeat_interleave(256)[: state.absmax.numel()] + state.offset
    values = state.code[idx].reshape(-1, 64) * absmax.unsqueeze(1)
    return values.reshape(state.shape)


@pytest.mark.parametrize("q", ["nf4", "fp4"])
def test_base_weight_is_bnb_dequantize_and_the_layers_matmul(folder, q):
    model = quantized(folder, q)
    reference = tiny_llama()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        w = base_weight(layer)
        assert w.dtype == torch.float32 and w.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(w, bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), rtol=0, atol=0)
        if layer.in_features % 64 == 0:  # bnb's CPU kernel mis-assigns the block scales otherwise
            if q == "nf4":
                torch.testing.assert_close(w, manual_dequant_nf4(layer), rtol=0, atol=1e-6)
            w0 = reference.get_submodule(name).weight
            assert 0 < (w - w0).abs().max() < 0.2 * w0.abs().max()  # a 4-bit approximation of W0
        x = torch.randn(5, layer.in_features, requires_grad=True)
        torch.testing.assert_close(layer(x), x @ w.t(), rtol=0, atol=1e-6)


def test_int8_base_weight_before_and_after_first_forward(folder):
    """LLM.int8(): W ≈ CB·SCB/127; bitsandbytes moves SCB from the weight to ``layer.state`` at the first
    forward, and base_weight must find it there (it used to fall back to the raw int8 codes)."""
    layer = quantized(folder, "int8").model.layers[0].mlp.up_proj
    w0 = tiny_llama().model.layers[0].mlp.up_proj.weight
    before = base_weight(layer)
    expected = layer.weight.data.float() * layer.weight.SCB.float().unsqueeze(1) / 127
    torch.testing.assert_close(before, expected, rtol=1e-6, atol=1e-9)
    assert (before - w0).abs().max() <= w0.abs().max(1).values.max() / 127
    x = torch.randn(4, layer.in_features, requires_grad=True)
    layer.train()
    torch.testing.assert_close(layer(x), x @ before.t(), rtol=0, atol=1e-6)
    assert layer.weight.SCB is None  # moved to layer.state
    torch.testing.assert_close(base_weight(layer), before, rtol=0, atol=0)


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_cpu_repacking_is_undone_by_base_weight_and_prevented_by_prepare():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(64, 128) * 0.05})
    layer = layer.to("cpu").eval()  # quantizes
    before = base_weight(layer)
    x = torch.randn(3, 128)
    with torch.no_grad():
        out = layer(x)  # eval + no-grad input: repacked for the AVX512-BF16 kernel
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = base_weight(layer)  # scales rounded to bf16 by the repacking, nothing else
    torch.testing.assert_close(after, before, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(out, x @ after.t(), rtol=0, atol=1e-2)

    fresh = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    fresh.load_state_dict({"weight": torch.randn(64, 128) * 0.05})
    fresh = quant.prepare_kbit_model(torch.nn.Sequential(fresh.to("cpu"))).eval()
    w = base_weight(fresh[0])
    with torch.no_grad():
        out = fresh(x)
    assert not getattr(fresh[0].weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(out, x @ w.t(), rtol=0, atol=1e-6)


def test_prepare_freezes_keeps_norms_in_load_dtype_and_head_fp32(tmp_path):
    """Frozen norms keep the bf16 load dtype (an fp32 copy would make the residual stream fp32); the
    trained head gets fp32 master weights."""
    save_tiny(tmp_path, "bert")
    model = load_model(ModelConfig(name_or_path=str(tmp_path), quantization="nf4", task="seq_cls", dtype="bfloat16"),
                       num_labels=3)
    assert type(model.classifier) is torch.nn.Linear  # a new, trained head is not quantized
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    quant.prepare_kbit_model(model)
    assert not any(p.requires_grad for p in model.parameters())
    for name, p in model.named_parameters():
        if name.startswith("classifier"):
            assert p.dtype == torch.float32, name
        elif "LayerNorm" in name:
            assert p.dtype == torch.bfloat16, name
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # large tensors keep their dtype
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.uint8


def test_dequantize_model_saves_a_plain_model(folder, tmp_path):
    model = quant.prepare_kbit_model(quantized(folder))
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    quant.dequantize_model(model, torch.float32)
    assert not quant.is_quantized_model(model)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert {type(m) for m in plain.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_kbit_optimizer_class(monkeypatch, capsys):
    monkeypatch.setattr(quant, "_SAID_CPU", False)
    assert quant.kbit_optimizer_class(torch.device("cpu")) is torch.optim.AdamW
    assert quant.kbit_optimizer_class(torch.device("cpu")) is torch.optim.AdamW
    err = capsys.readouterr().err
    assert err.count("paged AdamW needs CUDA") == 1
    cls = quant.kbit_optimizer_class(torch.device("cuda"))
    assert cls is bnb.optim.PagedAdamW32bit  # 32-bit states, paged (QLoRA §3)


def test_a_bf16_k_bit_base_keeps_its_residual_stream_in_bf16(folder):
    """Issue 17: fp32 norm weights (PEFT's prepare_model_for_kbit_training) turn every norm output, the
    projections after it and the residual stream into fp32 — the +3.9 GiB compiled QLoRA held on the GPU
    (docs/benchmarks.md). After prepare_kbit_model each layer's output stays in the bf16 load dtype."""
    model = quant.prepare_kbit_model(quantized(folder, dtype="bfloat16"))
    model.enable_input_require_grads()  # the training path (bitsandbytes' no-grad CPU kernel is another)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) > 2 and all(h.dtype == torch.bfloat16 for h in hidden), [h.dtype for h in hidden]
    upcast = quantized(folder, dtype="bfloat16")
    for name, p in upcast.named_parameters():
        if "norm" in name:
            p.data = p.data.float()  # what the old preparation did
    upcast.enable_input_require_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old = upcast(input_ids=ids, output_hidden_states=True).hidden_states
    assert old[-2].dtype == torch.float32  # the test would see the regression
