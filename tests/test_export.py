"""PEFT export (lorakit.export): every method with a PEFT equivalent writes a folder that
``peft.AutoPeftModel*.from_pretrained`` loads onto the saved tiny base and that gives lorakit's logits."""

import json
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.config import ModelConfig, recipe_from_dict
from lorakit.export import ExportReport
from lorakit.methods.peft_export import export_lora_family, peft_target_modules
from lorakit.storage.peft import write_peft_folder
from lorakit.methods.base import Method
from lorakit.methods.lora import LoraLayer
from lorakit.models import load_model
from lorakit.quant import prepare_kbit_model
from tests.conftest import TINY_MODELS, tiny_inputs
from tests.methods.harness import TASK, make, randomize_adapters
from tests.test_quant import save_tiny

AUTO_PEFT = {"causal_lm": AutoPeftModelForCausalLM, "seq_cls": AutoPeftModelForSequenceClassification}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each tiny base saved once, so ``base_model_name_or_path`` points at real weights."""
    root = tmp_path_factory.mktemp("bases")
    for kind, build in TINY_MODELS.items():
        build(0).save_pretrained(root / kind)
    return root


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny_inputs()).logits


def roundtrip(kind, method_cfg, bases, tmp_path, setup=None):
    """(lorakit logits, PEFT logits, config, tensors) after exporting a randomized adapter."""
    model, method = make(kind, method_cfg)
    randomize_adapters(model)
    if setup:
        setup(model, method)
    recipe = recipe_from_dict({"model": {"name_or_path": str(bases / kind), "task": TASK[kind]}, "method": method_cfg})
    assert write_peft_folder(tmp_path / "peft", model, method, recipe)
    peft_model = AUTO_PEFT[TASK[kind]].from_pretrained(str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    return logits(model), logits(peft_model), config, load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))


BASIC = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("name", ["lora", "lora_plus", "lora_fa", "dora"])
def test_lora_family_matches_peft(kind, name, bases, tmp_path):
    cfg = {"name": name, **BASIC, "target_modules": TARGETS[kind], "use_rslora": name == "lora_plus"}
    ours, theirs, config, tensors = roundtrip(kind, cfg, bases, tmp_path)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] == (name == "dora")
    assert config["target_modules"] == sorted(TARGETS[kind]) and config["fan_in_fan_out"] == (kind == "gpt2")
    assert config["task_type"] == {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[TASK[kind]]
    first = next(k for k in tensors if k.endswith("lora_A.weight"))
    assert first.startswith("base_model.model.") and tensors[first].shape[0] == 4
    if kind == "bert":  # the trained head travels as modules_to_save
        assert config["modules_to_save"] == ["classifier"] and "base_model.model.classifier.weight" in tensors
    if name == "dora":
        assert any(k.endswith(".lora_magnitude_vector") for k in tensors)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_vera_matches_peft(kind, bases, tmp_path):
    cfg = {"name": "vera", "r": 8, "lora_dropout": 0.0, "target_modules": TARGETS[kind]}
    ours, theirs, config, tensors = roundtrip(kind, cfg, bases, tmp_path)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    assert config["peft_type"] == "VERA" and tensors["base_model.vera_A"].shape[0] == 8
    assert any(k.endswith(".vera_lambda_b") for k in tensors) and any(k.endswith(".vera_lambda_d") for k in tensors)


def test_dylora_exports_plain_lora_at_the_chosen_rank(bases, tmp_path):
    cfg = {"name": "dylora", **BASIC, "r": 6, "target_modules": TARGETS["llama"]}
    ours, theirs, config, tensors = roundtrip("llama", cfg, bases, tmp_path, lambda m, meth: meth.set_rank(3))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    assert config["r"] == 3 and config["lora_alpha"] == 8
    assert all(t.shape[0] == 3 for k, t in tensors.items() if k.endswith("lora_A.weight"))


def test_delta_lora_exports_rank_2r_after_the_snapshot(bases, tmp_path):
    def snapshot_then_move(model, method):
        method.after_optimizer_step(0, None)  # K = 0: snapshot (A_K, B_K) now
        randomize_adapters(model, seed=9)  # then A, B move away from it

    cfg = {"name": "delta_lora", "r": 4, "lora_alpha": 8, "delta_start_step": 0, "target_modules": TARGETS["llama"]}
    ours, theirs, config, _ = roundtrip("llama", cfg, bases, tmp_path, snapshot_then_move)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["use_rslora"] is False


def test_lora_drop_shared_pairs_written_per_module(bases, tmp_path):
    from lorakit.methods.lora_drop_select import shape_groups

    def share(model, method):
        kept = ["model.layers.0.self_attn.q_proj"]
        method.apply_selection({"kept": kept, "shared_groups": shape_groups(method.layers, kept)})
        randomize_adapters(model, seed=11)

    cfg = {"name": "lora_drop", **BASIC, "target_modules": TARGETS["llama"]}
    ours, theirs, _, tensors = roundtrip("llama", cfg, bases, tmp_path, share)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    a = "base_model.model.model.layers.{}.self_attn.v_proj.lora_A.weight"
    torch.testing.assert_close(tensors[a.format(0)], tensors[a.format(1)], rtol=0, atol=0)  # one shared pair


def test_qlora_matches_peft_on_the_same_nf4_base(tmp_path):
    save_tiny(tmp_path / "base")
    mcfg = ModelConfig(name_or_path=str(tmp_path / "base"), quantization="nf4")
    recipe = recipe_from_dict({"model": mcfg.model_dump(), "method": {"name": "qlora", **BASIC}})
    model = prepare_kbit_model(load_model(mcfg))
    torch.manual_seed(0)
    from lorakit.methods import build_method

    method = build_method(recipe.method)
    method.attach(model)
    randomize_adapters(model)
    assert write_peft_folder(tmp_path / "peft", model, method, recipe)
    theirs = PeftModel.from_pretrained(prepare_kbit_model(load_model(mcfg)), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=2e-5)


def test_target_modules_fall_back_to_exact_paths():
    model, method = make("llama", {"name": "lora", **BASIC, "target_modules": r"model\.layers\.0\.self_attn\.q_proj"})
    assert peft_target_modules(model, list(method.layers)) == r"model\.layers\.0\.self_attn\.q_proj"
    model, method = make("llama", {"name": "lora", **BASIC, "target_modules": ["q_proj"]})
    assert peft_target_modules(model, list(method.layers)) == ["q_proj"]


def test_unfaithful_layers_export_nothing():
    class Odd(LoraLayer):
        def delta_weight(self):
            return 2 * super().delta_weight()

    class OddMethod(Method):
        name, paper, layer_class = "odd", "-", Odd

    model = TINY_MODELS["llama"](0)
    method = OddMethod(recipe_from_dict({"method": {"name": "lora", **BASIC}}).method)
    method.attach(model)
    assert export_lora_family(method, model) is None and method.export_peft(model) is None


# ---- through the command line -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_run")
    save_tiny(folder, texts=30)
    recipe = folder / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(folder)},
        "method": {"name": "dylora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": str(folder / "data.jsonl"), "format": "text", "max_seq_length": 24, "eval_fraction": 0.2},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 2, "num_samples": 0, "seed": 0},
        "output_dir": str(folder / "run"),
    }))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_training_writes_final_peft_folder(run):
    config = json.loads((run / "final" / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(run.parent.resolve())
    assert (run / "final" / "peft" / "adapter_model.safetensors").is_file()


def check_line(result) -> str:
    """The export's second stdout line (what was compared), after one line saying what was written."""
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("PEFT adapter (dylora) written to ") and "```" not in result.output
    assert "written" not in result.stderr
    return lines[1]


def diffs(line: str) -> dict[str, float]:
    return {who: float(line.split(who)[1].split(":")[1].split(";")[0]) for who in ("reloaded by lorakit", "loaded by PEFT")
            if who in line}


def test_cli_export_checks_with_lorakit_and_peft(run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run), "--format", "peft", "--rank", "2", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    line = check_line(result)
    assert line.startswith("largest |logit difference| to lorakit's model on ")
    found = diffs(line)
    assert set(found) == {"reloaded by lorakit", "loaded by PEFT"} and max(found.values()) < 1e-4
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 2
    assert (tmp_path / "p" / "tokenizer.json").is_file()
    again = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "p")])
    assert again.exit_code == 1 and "not empty" in again.output
    bad = CliRunner().invoke(app, ["export", str(run), "--format", "gguf", "-o", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "--format" in bad.output


def test_cli_export_without_peft_equivalent_points_to_merge(run, tmp_path, monkeypatch):
    monkeypatch.setattr("lorakit.methods.dylora.DyLora.export_peft", lambda self, model: None)
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no faithful PEFT equivalent" in result.output
    assert "lorakit merge" in " ".join(result.output.split()) and not (tmp_path / "none").exists()


def test_cli_export_without_peft_says_so_and_still_reloads(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    result = CliRunner().invoke(app, ["export", str(run), "--rank", "2", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    line = check_line(result)
    assert "not checked against PEFT (peft is not installed; pip install 'lorakit[peft]' to check)" in line
    assert set(diffs(line)) == {"reloaded by lorakit"} and diffs(line)["reloaded by lorakit"] < 1e-4


def test_cli_export_check_sees_a_wrong_export(run, tmp_path, monkeypatch):
    from lorakit import export

    def wrong(output, *args, **kwargs):  # an exporter bug: lora_alpha written 4x too large
        written = write_peft_folder(output, *args, **kwargs)
        config = json.loads((output / "adapter_config.json").read_text())
        (output / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4 * config["lora_alpha"]}))
        return written

    monkeypatch.setattr(export, "write_peft_folder", wrong)
    result = CliRunner().invoke(app, ["export", str(run), "--rank", "2", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert min(diffs(check_line(result)).values()) > 1e-3


def test_export_report_never_says_checked_when_nothing_was_compared(tmp_path):
    report = ExportReport(tmp_path, "vera", "base", checked=True, examples=8,
                          lorakit_note="lorakit reads back only LoRA and DoRA folders", peft_note="peft is not installed")
    assert report.lines()[1].startswith("not checked: not reloaded by lorakit")
    assert ExportReport(tmp_path, "lora", "base").lines()[1] == "not checked (--no-check)"
