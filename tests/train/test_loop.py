import json

import pytest
import torch
from rich.console import Console

from lorakit.config import recipe_from_dict
from lorakit.methods import build_method
from lorakit.train.loop import Trainer
from tests.conftest import tiny_bert, tiny_llama
from tests.helpers import toy_data


def make_trainer(tmp_path, name="run", method=None, train=None, kind="llama", method_state=None):
    task = "seq_cls" if kind == "bert" else "causal_lm"
    recipe = recipe_from_dict({
        "model": {"task": task},
        "method": {"name": "lora", "r": 4, "lora_dropout": 0.1, **(method or {})},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 6,
                  "save_every": 3, "warmup_ratio": 0.2, "lr_scheduler": "cosine", "weight_decay": 0.01, **(train or {})},
        "output_dir": str(tmp_path / name),
    })
    model = tiny_bert() if kind == "bert" else tiny_llama()
    torch.manual_seed(recipe.train.seed)
    m = build_method(recipe.method)
    m.attach(model, task)
    if method_state:
        m.load_state_dict(method_state)
    data = toy_data(classes=3 if kind == "bert" else None)
    return Trainer(model, None, m, data, recipe, torch.device("cpu"), Console(quiet=True))


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_training_lowers_loss(tmp_path, kind):
    trainer = make_trainer(tmp_path, kind=kind, train={"max_steps": 40, "save_every": None})
    before = trainer.evaluate()["eval_loss"]
    after = trainer.train()["eval_loss"]
    assert after < before - 0.1


def test_resume_gives_same_next_losses(tmp_path):
    """LoRA with dropout: an "interrupted" run resumed from its step-3 checkpoint matches the full run."""
    from tests.methods.harness import check_resume_continues

    check_resume_continues(tmp_path, {"name": "lora"})


def test_accumulation_matches_big_batch(tmp_path):
    """2 micro-batches of 4 with token-weighted accumulation = 1 batch of 8 (no dropout)."""
    a = make_trainer(tmp_path, "a", method={"lora_dropout": 0.0}, train={"max_steps": 1, "batch_size": 4, "gradient_accumulation_steps": 2, "precision": "fp32"})
    b = make_trainer(tmp_path, "b", method={"lora_dropout": 0.0}, train={"max_steps": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "precision": "fp32"})
    b.micro.per_epoch = a.micro.per_epoch  # same order: batch k of 8 = micro-batches 2k, 2k+1 of 4
    a.train(); b.train()
    assert losses(tmp_path / "a")[1] == pytest.approx(losses(tmp_path / "b")[1], rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_checkpoint_files(tmp_path):
    t = make_trainer(tmp_path)
    t.train()
    run = tmp_path / "run"
    assert (run / "checkpoints/latest").read_text() == "step-000006"
    for name in ("adapter.safetensors", "method.json", "recipe.yaml", "trainer_state.pt", "trainer.json"):
        assert (run / "checkpoints/step-000003" / name).is_file()
    assert (run / "final/adapter.safetensors").is_file()
    assert not list(run.glob("**/.*tmp*"))


def test_nan_loss_stops_cleanly_before_the_update(tmp_path):
    from lorakit.errors import LorakitError

    t = make_trainer(tmp_path, train={"max_steps": 2, "save_every": None})
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    real_loss = t.loss
    t.loss = lambda batch, num_items=None: real_loss(batch, num_items) * float("nan")
    with pytest.raises(LorakitError, match="loss became nan at step 1; lower train.learning_rate"):
        t.train()
    for n, p in t.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_evaluation_alone_does_not_compile(tmp_path):
    """``lorakit eval`` builds its Trainer with allow_compile=False: one pass is not worth a compile."""
    compiled = make_trainer(tmp_path, "a", train={"compile": True})
    assert compiled.levers == ["compile×2"] and not compiled.cuda_graphs
    assert compiled.speed_summary() == ["precision fp32", "loss chunked", "optimizer AdamW", "compile×2"]
    t = make_trainer(tmp_path, "b")
    plain = Trainer(tiny_llama(), None, t.method, t.data, t.recipe.model_copy(update={"train": compiled.recipe.train}),
                    torch.device("cpu"), Console(quiet=True), allow_compile=False)
    assert plain.levers == [] and plain.speed_summary() == ["precision fp32", "loss chunked", "optimizer AdamW"]


def test_speed_line_of_a_classifier_names_its_loss(tmp_path):
    summary = make_trainer(tmp_path, kind="bert").speed_summary()
    assert summary[1] == "loss cross-entropy over the class logits" and "chunked" not in " ".join(summary)


def test_activation_memory_budget_reaches_the_partitioner_of_compiled_layers(tmp_path):
    """``train.activation_memory_budget`` sets torch.compile's partitioner budget when the layers compile
    (reset to the recipe's value by every trainer) and is named as ignored when they do not."""
    import torch._functorch.config as functorch_config

    budget = make_trainer(tmp_path, "a", train={"compile": True, "activation_memory_budget": 0.5})
    assert functorch_config.activation_memory_budget == 0.5
    assert budget.levers == ["compile×2", "activation memory budget 0.5"]
    make_trainer(tmp_path, "b", train={"compile": True})
    assert functorch_config.activation_memory_budget == 1.0
    eager = make_trainer(tmp_path, "c", train={"compile": False, "activation_memory_budget": 0.5})
    assert eager.levers == ["activation memory budget 0.5 ignored (layers not compiled)"]


def test_logged_lr_is_the_lr_each_step_used(tmp_path):
    """metrics.jsonl's lr at step k is what optimizer step k ran with (linear decay from the peak, no
    warmup: 1, 2/3, 1/3 of it over 3 steps), not the next step's."""
    trainer = make_trainer(tmp_path, train={"max_steps": 3, "save_every": None, "warmup_ratio": 0.0,
                                            "lr_scheduler": "linear", "gradient_accumulation_steps": 1})
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert logged == pytest.approx({1: 1e-2, 2: 1e-2 * 2 / 3, 3: 1e-2 / 3})
