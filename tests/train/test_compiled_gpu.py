"""train.compile on CUDA (the default, ``auto`` → CUDA graphs) against eager, every method, with batches
padded to a multiple of 64 (toy rows of 6–12 tokens: one width; tests/test_cli_gpu.py varies it), with
gradient accumulation, with the default dropout, and
DyLoRA evaluated at lower ranks after compiled training, and QLoRA (NF4 base, opt-in
``train.compile: cudagraphs``); no compiled piece may skip CUDA graphs.

In fp32 compiled and eager differ only in summation order, so their losses must agree to 1% of what
training moves the loss (each run is compared with the same run at learning rate 1e-12, which must differ
by > 1e-3: an adapter that never updates, a stale gradient or a wrong projection fails). In bf16 (the
default precision on CUDA) rounding differs between kernels, so those runs must agree to 25% of it.
Skipped without CUDA (CI has none); run on a GPU with ``bash scripts/gpu_checks.sh``."""

import pytest
import torch
from rich.console import Console
from torch._dynamo.utils import counters

from lorakit.config import recipe_from_dict
from lorakit.methods import build_method
from lorakit.methods.lora_drop_select import shape_groups
from lorakit.train.loop import Trainer
from tests.conftest import tiny_llama
from tests.helpers import pad_collate, toy_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICE = torch.device("cuda")
STEPS, LR, FROZEN = 8, 3e-2, 1e-12  # FROZEN: a learning rate that leaves the adapter as it is
TOL = {"fp32": 1e-2, "bf16": 0.25}  # of the loss change training makes (module docstring)

METHODS = {"lora": {}, "dora": {}, "vera": {"r": 16}, "lora_fa": {}, "dylora": {},
           "delta_lora": {"delta_start_step": 2}, "lora_plus": {"loraplus_lr_ratio": 4.0},
           "lora_fa+projection": {"gradient_projection": True}, "lora_drop": {}}
EXTRA = {"qlora": {}}  # not in the every-method test: needs bitsandbytes and a saved model


class Pad64:
    """toy_data's collate with lorakit.data.Collator's ``pad_to_multiple_of`` (which the trainer sets)."""

    def __init__(self):
        self.pad_to_multiple_of = 1

    def __call__(self, rows):
        batch = pad_collate(rows)
        extra = -batch["input_ids"].shape[1] % self.pad_to_multiple_of
        pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        return {k: torch.nn.functional.pad(v, (0, extra), value=pads[k]) for k, v in batch.items()}


def make_trainer(key: str, compile_choice, tmp_path, accumulation: int = 1, dropout: float = 0.0,
                 precision: str = "fp32", lr: float = LR, model_folder=None) -> Trainer:
    """A Trainer for ``key`` on the tiny Llama (or, for ``qlora``, the tiny Llama saved in
    ``model_folder`` and loaded with an NF4 base)."""
    name = key.split("+")[0]
    method = {"name": name, "r": 4, "lora_dropout": dropout, **{**METHODS, **EXTRA}[key]}
    if name != "vera":
        method["lora_alpha"] = 8
    recipe = recipe_from_dict({
        "model": {"quantization": "nf4" if name == "qlora" else None},
        "method": method,
        "train": {"learning_rate": lr, "batch_size": 4, "max_steps": STEPS, "lr_scheduler": "constant",
                  "compile": compile_choice, "gradient_accumulation_steps": accumulation, "precision": precision},
        "output_dir": str(tmp_path / f"{key}-{compile_choice}-{accumulation}-{dropout}-{precision}-{lr}"),
    })
    torch.manual_seed(0)
    if name == "qlora":
        from lorakit.config import ModelConfig
        from lorakit.models import load_model
        from lorakit.quant import prepare_kbit_model

        model = prepare_kbit_model(load_model(ModelConfig(name_or_path=str(model_folder), quantization="nf4"),
                                              precision=precision))
    else:
        model = tiny_llama().to(DEVICE)
    torch.manual_seed(0)
    m = build_method(recipe.method)
    m.attach(model, "causal_lm")
    if name == "lora_drop":  # a made-up selection: layer 0 keeps its pairs, layer 1 shares one per shape
        kept = [n for n in m.layers if ".0." in n]
        m.apply_selection({"kept": kept, "shared_groups": shape_groups(m.layers, kept)})
    model.train()  # as Trainer.train does (tiny_llama and from_pretrained give eval mode: no dropout)
    data = toy_data()
    data.collate = Pad64()
    return Trainer(model, None, m, data, recipe, DEVICE, Console(quiet=True))


def losses(key: str, compile_choice, tmp_path, accumulation: int = 1, dropout: float = 0.0,
           precision: str = "fp32", lr: float = LR, model_folder=None):
    """(first STEPS losses, trainer) of ``key`` trained with ``train.compile: compile_choice``."""
    trainer = make_trainer(key, compile_choice, tmp_path, accumulation, dropout, precision, lr, model_folder)
    optimizer, scheduler = trainer.make_optimizer()
    torch.manual_seed(1)
    out = [trainer.optimizer_step([trainer.micro[k * accumulation + i] for i in range(accumulation)], optimizer, scheduler)
           for k in range(STEPS)]
    return [s.read()[0] for s in out], trainer


def check_tracks(compiled: list[float], eager: list[float], frozen: list[float], tol: float, what: str) -> None:
    """compiled and eager agree to ``tol`` of the largest loss change training made (eager vs frozen)."""
    moved = max(abs(e - f) for e, f in zip(eager, frozen))
    gap = max(abs(c - e) for c, e in zip(compiled, eager))
    assert moved > 1e-3, f"{what}: training barely moved the loss ({moved:.2e}); the check would be vacuous"
    assert gap < tol * moved, f"{what}: compiled {compiled} vs eager {eager} (frozen {frozen})"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    assert counters["inductor"]["cudagraph_skips"] == 0, "a compiled piece ran without CUDA graphs"


@pytest.mark.parametrize("key", sorted(METHODS))
def test_cuda_graph_default_matches_eager(tmp_path, key):
    compiled, trainer = losses(key, "auto", tmp_path)
    assert trainer.cuda_graphs, trainer.levers
    eager, _ = losses(key, False, tmp_path)
    frozen, _ = losses(key, False, tmp_path, lr=FROZEN)
    check_tracks(compiled, eager, frozen, TOL["fp32"], key)


@pytest.mark.parametrize("key", ["lora", "dora", "vera", "lora_fa+projection", "dylora"])
def test_cuda_graph_default_matches_eager_in_bf16(tmp_path, key):
    compiled, trainer = losses(key, "auto", tmp_path, precision="bf16")
    assert trainer.cuda_graphs and trainer.precision == "bf16"
    eager, _ = losses(key, False, tmp_path, precision="bf16")
    frozen, _ = losses(key, False, tmp_path, precision="bf16", lr=FROZEN)
    check_tracks(compiled, eager, frozen, TOL["bf16"], key)


@pytest.mark.parametrize("choice", ["auto", "cudagraphs"])
def test_gradient_accumulation_under_compile_matches_eager(tmp_path, choice):
    """2 micro-batches per step: auto compiles without CUDA graphs; explicit cudagraphs gives each
    .grad its own memory after the first micro-batch (Trainer._own_grads)."""
    compiled, trainer = losses("lora", choice, tmp_path, accumulation=2)
    assert trainer.cuda_graphs == (choice == "cudagraphs") and trainer.levers, trainer.levers
    eager, _ = losses("lora", False, tmp_path, accumulation=2)
    frozen, _ = losses("lora", False, tmp_path, accumulation=2, lr=FROZEN)
    check_tracks(compiled, eager, frozen, TOL["fp32"], choice)


@pytest.mark.parametrize("key", ["lora", "dora", "lora_fa", "vera"])
def test_default_dropout_under_cuda_graphs(tmp_path, key):
    """lora_dropout 0.05 (the recipes' default): compiled and eager draw different masks, and on this tiny
    model the masks alone move single losses by ±0.03, so only the trend is compared: over the last 4
    steps the compiled run must lower the loss below the frozen run's by at least 0.4× what eager does
    (LoRA-FA on CPU, 6 seeds each: eager 0.06–0.09, compiled 0.05–0.09; VeRA moves ~0.02)."""
    compiled, trainer = losses(key, "auto", tmp_path, dropout=0.05)
    assert trainer.cuda_graphs
    eager, _ = losses(key, False, tmp_path, dropout=0.05)
    frozen, _ = losses(key, False, tmp_path, dropout=0.05, lr=FROZEN)
    drop = [sum(frozen[-4:]) / 4 - sum(run[-4:]) / 4 for run in (compiled, eager)]
    assert all(torch.isfinite(torch.tensor(compiled))) and drop[1] > 0.01 and drop[0] > 0.4 * drop[1], (key, drop)


def test_dylora_ranks_evaluated_after_compiled_training(tmp_path):
    """Evaluation at ranks below r through the compiled layers equals the same weights evaluated
    eagerly, to 1% of the spread between the ranks."""
    _, trainer = losses("dylora", "auto", tmp_path)
    compiled = trainer.evaluate(ranks="1,2,4")
    eager_trainer = make_trainer("dylora", False, tmp_path)
    eager_trainer.model.load_state_dict(trainer.model.state_dict())
    eager = eager_trainer.evaluate(ranks="1,2,4")
    by_rank = {b: (compiled[f"rank_{b}"]["eval_loss"], eager[f"rank_{b}"]["eval_loss"]) for b in (1, 2, 4)}
    spread = max(e for _, e in by_rank.values()) - min(e for _, e in by_rank.values())
    assert spread > 1e-4, by_rank
    assert all(abs(c - e) < 1e-2 * spread for c, e in by_rank.values()), by_rank


def test_qlora_under_cuda_graphs_matches_eager(tmp_path):
    """QLoRA (bitsandbytes NF4 base, bf16 compute, fused AdamW) under CUDA graphs, what ``train.compile:
    auto`` does over a k-bit base since issue 17 (docs/benchmarks.md: 0.93–0.97× of LoRA)."""
    pytest.importorskip("bitsandbytes")
    from tests.test_quant import save_tiny

    folder = tmp_path / "tiny"
    save_tiny(folder)
    kw = dict(precision="bf16", model_folder=folder)
    compiled, trainer = losses("qlora", "cudagraphs", tmp_path, **kw)
    assert trainer.cuda_graphs
    eager, _ = losses("qlora", False, tmp_path, **kw)
    frozen, _ = losses("qlora", False, tmp_path, lr=FROZEN, **kw)
    check_tracks(compiled, eager, frozen, TOL["bf16"], "qlora")
