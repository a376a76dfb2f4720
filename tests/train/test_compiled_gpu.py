"""train.compile on CUDA (the default, ``auto`` → CUDA graphs): the same losses as eager, every method,
with batches of changing width. Skipped without CUDA (CI has none); run on a GPU with
``python -m pytest tests/train/test_compiled_gpu.py``."""

import pytest
import torch
from rich.console import Console

from lorakit.config import recipe_from_dict
from lorakit.methods import build_method
from lorakit.train.loop import Trainer
from tests.conftest import tiny_llama
from tests.helpers import toy_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
STEPS, TOL = 8, 2e-2  # bf16 autocast: eager and compiled kernels round differently

METHODS = {"lora": {}, "dora": {}, "vera": {"r": 16}, "lora_fa": {}, "dylora": {},
           "delta_lora": {"delta_start_step": 2}, "lora_plus": {"loraplus_lr_ratio": 4.0}}


def losses(name: str, compile_choice, tmp_path) -> tuple[list[float], list[str]]:
    method = {"name": name, "r": 4, "lora_dropout": 0.0, **METHODS[name]}
    if name != "vera":
        method["lora_alpha"] = 8
    recipe = recipe_from_dict({
        "method": method,
        "train": {"learning_rate": 3e-3, "batch_size": 4, "max_steps": STEPS, "lr_scheduler": "constant",
                  "compile": compile_choice},
        "output_dir": str(tmp_path / f"{name}-{compile_choice}"),
    })
    torch.manual_seed(0)
    model = tiny_llama()
    m = build_method(recipe.method)
    m.attach(model, "causal_lm")
    model.cuda()
    trainer = Trainer(model, None, m, toy_data(), recipe, torch.device("cuda"), Console(quiet=True))
    optimizer, scheduler = trainer.make_optimizer()
    torch.manual_seed(1)
    out = [trainer.optimizer_step([trainer.micro[k]], optimizer, scheduler) for k in range(STEPS)]
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
