"""train.compile on CUDA (the default, ``auto`` → CUDA graphs): the same losses as eager, every method,
with batches of changing width padded to multiples of 64, and with gradient accumulation. Skipped without CUDA (CI has none); run on a GPU with
``python -m pytest tests/train/test_compiled_gpu.py``."""

import pytest
import torch
from rich.console import Console

from lorakit.config import recipe_from_dict
from lorakit.methods import build_method
from lorakit.train.loop import Trainer
from tests.conftest import tiny_llama
from tests.helpers import pad_collate, toy_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
STEPS, TOL = 8, 2e-2  # bf16 autocast: eager and compiled kernels round differently

METHODS = {"lora": {}, "dora": {}, "vera": {"r": 16}, "lora_fa": {}, "dylora": {},
           "delta_lora": {"delta_start_step": 2}, "lora_plus": {"loraplus_lr_ratio": 4.0}}


class Pad64:
    """toy_data's collate with lorakit.data.Collator's ``pad_to_multiple_of`` (which the trainer sets)."""

    def __init__(self):
        self.pad_to_multiple_of = 1

    def __call__(self, rows):
        batch = pad_collate(rows)
        extra = -batch["input_ids"].shape[1] % self.pad_to_multiple_of
        pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        return {k: torch.nn.functional.pad(v, (0, extra), value=pads[k]) for k, v in batch.items()}


def losses(name: str, compile_choice, tmp_path, accumulation: int = 1) -> tuple[list[float], list[str]]:
    method = {"name": name, "r": 4, "lora_dropout": 0.0, **METHODS[name]}
    if name != "vera":
        method["lora_alpha"] = 8
    recipe = recipe_from_dict({
        "method": method,
        "train": {"learning_rate": 3e-3, "batch_size": 4, "max_steps": STEPS, "lr_scheduler": "constant",
                  "compile": compile_choice, "gradient_accumulation_steps": accumulation},
        "output_dir": str(tmp_path / f"{name}-{compile_choice}-{accumulation}"),
    })
    torch.manual_seed(0)
    model = tiny_llama()
    m = build_method(recipe.method)
    m.attach(model, "causal_lm")
    model.cuda()
    data = toy_data()
    data.collate = Pad64()
    trainer = Trainer(model, None, m, data, recipe, torch.device("cuda"), Console(quiet=True))
    optimizer, scheduler = trainer.make_optimizer()
    torch.manual_seed(1)
    out = [trainer.optimizer_step([trainer.micro[k * accumulation + i] for i in range(accumulation)], optimizer, scheduler)
           for k in range(STEPS)]
    return [s.read()[0] for s in out], trainer.levers


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_graph_default_matches_eager(tmp_path, name):
    torch._dynamo.reset()
    compiled, levers = losses(name, "auto", tmp_path)
    assert any("reduce-overhead" in lever for lever in levers), levers
    eager, _ = losses(name, False, tmp_path)
    assert len(set(eager)) > 1  # the adapter moves (DyLoRA barely lowers the loss in 8 steps)
    worst = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
    assert worst < TOL, f"{name}: compiled {compiled} vs eager {eager}"


@pytest.mark.parametrize("choice", ["auto", "cudagraphs"])
def test_gradient_accumulation_under_compile_matches_eager(tmp_path, choice):
    """2 micro-batches per step: auto compiles without CUDA graphs; explicit cudagraphs gives each
    .grad its own memory after the first micro-batch (Trainer._own_grads)."""
    torch._dynamo.reset()
    compiled, levers = losses("lora", choice, tmp_path, accumulation=2)
    assert any(("reduce-overhead" in lever) == (choice == "cudagraphs") for lever in levers), levers
    eager, _ = losses("lora", False, tmp_path, accumulation=2)
    worst = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
    assert worst < TOL, f"compiled {compiled} vs eager {eager}"
