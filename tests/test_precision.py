"""train.precision: what auto resolves to, recipe errors, and that evaluation follows training's choice."""

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from lorakit import precision as P
from lorakit.config import recipe_from_dict
from lorakit.errors import RecipeError
from lorakit.evaluate import evaluate_model
from lorakit.fast.attention import NAME, sdpa_fp32, use_fp32_attention
from lorakit.methods import build_method
from lorakit.data.batches import iterate_batches
from lorakit.train.loop import Trainer
from tests.conftest import tiny_llama
from tests.helpers import toy_data

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_only():
    assert P.resolve_precision("auto", CPU) == "fp32"
    assert P.resolve_precision("auto", CUDA) == "bf16"
    assert P.resolve_precision("fp32", CUDA) == "fp32" and P.resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="train.precision 'fp16'"):
        P.resolve_precision("fp16", CPU)


def test_bad_value_is_one_line_naming_the_field():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"train": {"precision": "half"}})
    assert "train.precision = 'half' is invalid" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("choice", ["fp32", "bf16"])
def test_trainer_evaluates_in_its_training_precision(tmp_path, choice):
    recipe = recipe_from_dict({"method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
                               "train": {"batch_size": 4, "max_steps": 1, "precision": choice},
                               "output_dir": str(tmp_path)})
    model = tiny_llama()
    method = build_method(recipe.method)
    method.attach(model, "causal_lm")
    data = toy_data()
    trainer = Trainer(model, None, method, data, recipe, CPU, Console(quiet=True))

    def direct(p):
        batches = iterate_batches(data.eval, data.collate, 4, None)
        return evaluate_model(model, batches, "causal_lm", CPU, "chunked", p)["eval_loss"]

    assert trainer.precision == choice
    got = trainer.evaluate()["eval_loss"]
    assert got == direct(choice) and got != direct("fp32" if choice == "bf16" else "bf16")


def test_fp32_attention_equals_sdpa_on_upcast_inputs():
    model = tiny_llama().to(torch.bfloat16)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # must not cast the fp32 copies back
        out, _ = sdpa_fp32(attn, q, k, v, None, is_causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())
    assert use_fp32_attention(model) and model.config._attn_implementation == NAME
    assert not use_fp32_attention(tiny_llama())  # fp32 models keep transformers' SDPA
    ids = torch.randint(0, 96, (2, 9), generator=g)
    assert torch.isfinite(model(input_ids=ids).logits).all()
