"""QLoRA (Dettmers et al. 2023) and k-bit bases under every method: tiny Llama / BERT saved to disk and
loaded through lorakit.models with bitsandbytes quantization (runs on CPU, fp32 compute)."""

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.config import ModelConfig, recipe_from_dict
from lorakit.errors import RecipeError
from lorakit.merge import merge_run
from lorakit.methods import build_method
from lorakit.methods.base import AdapterLayer
from lorakit.models import load_model
from lorakit.quant import dequantize_model, is_quantized_model, prepare_kbit_model
from lorakit.session import Checkpoint, load_run, load_session
from lorakit.train.loop import Trainer
from tests.conftest import tiny_inputs
from tests.methods.harness import randomize_adapters
from tests.test_quant import save_tiny

QUIET = Console(quiet=True)
CFG = {"name": "qlora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora_llama")
    save_tiny(path, texts=40)
    return path


def attach(folder, method=CFG, quantization="nf4", task="causal_lm", seed=0):
    """(model, method): the saved tiny model loaded k-bit, prepared, with the method attached."""
    cfg = recipe_from_dict({"method": method, "model": {"quantization": quantization}}).method
    model = prepare_kbit_model(load_model(ModelConfig(name_or_path=str(folder), quantization=quantization, task=task)))
    torch.manual_seed(seed)
    m = build_method(cfg)
    m.attach(model, task)
    return model, m


def logits(model, train=False):
    model.train(train)
    with torch.no_grad():
        return model(**tiny_inputs()).logits


def test_recipe_defaults_are_qloras():
    recipe = recipe_from_dict({"method": {"name": "qlora"}})
    assert recipe.model.quantization == "nf4"
    m = recipe.method
    assert (m.r, m.lora_alpha, m.lora_dropout, m.target_modules) == (64, 16.0, 0.05, "all-linear")
    assert recipe_from_dict({"method": {"name": "qlora"}, "model": {"quantization": "int8"}}).model.quantization == "int8"
    assert recipe_from_dict({"method": {"name": "lora"}}).model.quantization is None
    assert recipe_from_dict({"method": {"name": "dora"}, "model": {"quantization": "nf4"}}).model.quantization == "nf4"
    with pytest.raises(RecipeError, match="needs a quantized base"):
        recipe_from_dict({"method": {"name": "qlora"}, "model": {"quantization": None}})


def test_adapter_wraps_linear4bit_and_is_a_noop_at_init(folder):
    model, method = attach(folder)
    assert len(method.layers) == 14 and "lm_head" not in method.layers
    for layer in method.layers.values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.quant_type == "nf4"
        assert layer.lora_A.weight.dtype == torch.float32 and layer.scaling == 2.0
    base = prepare_kbit_model(load_model(ModelConfig(name_or_path=str(folder), quantization="nf4")))
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_only_adapters_get_gradients(folder, quantization):
    model, _ = attach(folder, quantization=quantization)
    randomize_adapters(model)
    model.train()
    model(**tiny_inputs()).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_A" in name or "lora_B" in name, name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_same_outputs_and_gradients_as_peft(folder, quantization):
    """PEFT's LoRA over the same bitsandbytes model, loaded with lorakit's A and B."""
    from peft import LoraConfig, get_peft_model

    model, method = attach(folder, quantization=quantization)
    randomize_adapters(model)
    base = prepare_kbit_model(load_model(ModelConfig(name_or_path=str(folder), quantization=quantization)))
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    theirs = {f"base_model.model.{n}.{ab}.default.weight": getattr(layer, ab).weight.detach()
              for n, layer in method.layers.items() for ab in ("lora_A", "lora_B")}
    assert theirs.keys() == {k for k in peft.state_dict() if "lora_" in k}
    peft.load_state_dict(theirs, strict=False)
    model.train(), peft.train()
    ours_out, peft_out = model(**tiny_inputs()).logits, peft(**tiny_inputs()).logits
    torch.testing.assert_close(ours_out, peft_out, rtol=0, atol=1e-6)
    ours_out.pow(2).mean().backward()
    peft_out.pow(2).mean().backward()
    params = dict(peft.named_parameters())
    for n, layer in method.layers.items():
        for ab in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, ab).weight.grad, params[f"base_model.model.{n}.{ab}.default.weight"].grad,
                                       rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_merge_onto_dequant_reproduces_the_adapter_model(folder, quantization):
    model, method = attach(folder, quantization=quantization)
    randomize_adapters(model)
    expected_train, expected_eval = logits(model, train=True), logits(model)
    merged = dequantize_model(method.merge(model, torch.float32), torch.float32)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules()) and not is_quantized_model(merged)
    torch.testing.assert_close(logits(merged, train=True), expected_train, rtol=0, atol=1e-5)
    # int8 in eval mode quantizes the activations too (LLM.int8()); the trained (train-mode) function is exact
    torch.testing.assert_close(logits(merged), expected_eval, rtol=0, atol=1e-5 if quantization != "int8" else 0.1)


def test_qdora_trains_and_merges_over_nf4(folder):
    """DoRA over NF4: its row norm goes through the 4-bit base (no dequantized W0 + sBA in the forward)."""
    model, method = attach(folder, {"name": "dora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    layer = next(iter(method.layers.values()))
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(layer.magnitude.detach(), layer.weight_norm(), rtol=1e-5, atol=1e-6)  # ‖dequant(Wq)‖_row
    batch = {**tiny_inputs(4, 10), "labels": tiny_inputs(4, 10)["input_ids"]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert layer.magnitude.grad is None and (layer.magnitude.detach() - layer.weight_norm()).abs().max() > 0
    expected = logits(model)
    merged = dequantize_model(method.merge(model, torch.float32), torch.float32)
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)


def test_seq_cls_head_is_unquantized_and_trained(tmp_path):
    save_tiny(tmp_path, "bert")
    cfg = recipe_from_dict({"model": {"task": "seq_cls"}, "method": {**CFG, "target_modules": ["query", "value"]}}).method
    model = prepare_kbit_model(load_model(ModelConfig(name_or_path=str(tmp_path), quantization="nf4", task="seq_cls"), num_labels=3))
    m = build_method(cfg)
    m.attach(model, "seq_cls")
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.requires_grad
    model.train()
    model(**tiny_inputs()).logits.pow(2).mean().backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def toy_recipe(folder, name: str, **train):
    return recipe_from_dict({
        "model": {"name_or_path": str(folder)},
        "method": {"name": "qlora", "r": 8, "lora_alpha": 16},
        "data": {"source": str(folder / "data.jsonl"), "format": "text", "max_seq_length": 32, "eval_fraction": 0.2},
        "train": {"learning_rate": 1e-2, "batch_size": 8, "max_steps": 12, "lr_scheduler": "constant", "seed": 0, **train},
        "output_dir": str(folder / name),
    })


@pytest.fixture(scope="module")
def run(folder):
    """A QLoRA run through the session and the Trainer on toy text: (run folder, session, before, after)."""
    recipe = toy_recipe(folder, "run")
    session = load_session(recipe, console=QUIET)
    trainer = Trainer(session.model, session.tokenizer, session.method, session.data, recipe, session.device, QUIET)
    before = trainer.evaluate()["eval_loss"]
    after = trainer.train()["eval_loss"]
    return folder / "run", session, before, after


def test_training_through_the_trainer_lowers_the_loss(run):
    _, session, before, after = run
    assert isinstance(session.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert session.model.model.norm.weight.dtype == torch.float32
    assert after < before - 0.1


def test_checkpoint_holds_adapters_only_and_reloads(run):
    run_dir, session, _, _ = run
    keys = load_file(str(run_dir / "final" / "adapter.safetensors")).keys()
    assert len(keys) == 28 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    reloaded, path = load_run(run_dir, QUIET)
    assert path == run_dir / "final" and isinstance(reloaded.method.layers["model.layers.0.mlp.up_proj"].base_layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(logits(reloaded.model), logits(session.model), rtol=0, atol=0)


def test_merge_saves_a_plain_model_that_reproduces_the_adapter_model(run, tmp_path):
    run_dir, session, _, _ = run
    console = Console(record=True, width=400)
    diff, _, _ = merge_run(run_dir, tmp_path / "merged", "auto", console)
    assert diff < 1e-5 and "onto dequant(Wq) of the nf4 base" in console.export_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(plain.config, "quantization_config", None) is None
    assert {type(m) for m in plain.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    torch.testing.assert_close(logits(plain), logits(session.model), rtol=0, atol=1e-5)


def test_merge_onto_original_weights_reports_the_deviation(run, tmp_path):
    run_dir, session, _, _ = run
    console = Console(record=True, width=400)
    diff, _, _ = merge_run(run_dir, tmp_path / "orig", "auto", console, onto="original")
    assert "onto the original weights of" in console.export_text()
    assert 1e-4 < diff < 1.0  # the quantization error, not the adapter, separates them
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "orig")
    # the merged weights are W0 + s·BA with W0 the saved full-precision weights
    reloaded, _ = load_run(run_dir, QUIET)
    layer = reloaded.method.layers["model.layers.1.mlp.down_proj"]
    w0 = AutoModelForCausalLM.from_pretrained(run_dir.parent).model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(plain.model.layers[1].mlp.down_proj.weight, w0 + layer.delta_weight(), rtol=0, atol=1e-6)


def test_resume_continues_identically(folder):
    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    recipe = toy_recipe(folder, "full", max_steps=4, save_every=2)
    session = load_session(recipe, console=QUIET)
    Trainer(session.model, session.tokenizer, session.method, session.data, recipe, session.device, QUIET).train()
    cut = folder / "cut" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copytree(folder / "full/checkpoints/step-000002", cut / "step-000002")
    recipe = toy_recipe(folder, "cut", max_steps=4, save_every=2)
    session = load_session(recipe, Checkpoint(cut / "step-000002"), QUIET)
    Trainer(session.model, session.tokenizer, session.method, session.data, recipe, session.device, QUIET).train(
        resume_from=cut / "step-000002")
    expected, got = losses(folder / "full"), losses(folder / "cut")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)


def test_cli_merge_onto_option(run, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    run_dir = run[0]
    bad = CliRunner().invoke(app, ["merge", str(run_dir), "-o", str(tmp_path / "x"), "--onto", "nowhere"])
    assert bad.exit_code == 2 and "expected dequant or original" in bad.output
    ok = CliRunner().invoke(app, ["merge", str(run_dir), "-o", str(tmp_path / "m"), "--onto", "original"])
    assert ok.exit_code == 0, ok.output
    text = " ".join(ok.output.split())
    assert "onto the original weights" in text and "largest |logit difference| vs the adapter model" in text


def test_compiled_layer_saves_packed_weights_not_dequantized_ones(folder):
    """Under torch.compile (opt-in over a k-bit base) a decoder layer keeps for backward only the packed
    4-bit weights and their statistics; W0 is dequantized again inside the backward graph
    (docs/benchmarks.md: QLoRA's compiled memory)."""
    from lorakit.fast.kernels import decoder_layers
    from tests.methods.harness import compile_recording, graph_outputs

    model, _ = attach(folder)
    model.train()
    layers = decoder_layers(model)
    shapes = {s for m in layers[0].modules() if type(m).__name__ == "Linear4bit"
              for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))}  # W0 or W0ᵀ
    layers[0], graphs = compile_recording(layers[0])
    inputs = tiny_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    saved = [v for v in graph_outputs(graphs["forward"][0])[1:] if isinstance(v, torch.Tensor)]
    assert shapes and not [v.shape for v in saved if v.dtype.is_floating_point and tuple(v.shape) in shapes]
    assert any(v.dtype == torch.uint8 for v in saved)
    assert any("dequantize" in gm.code for gm in graphs["backward"])
