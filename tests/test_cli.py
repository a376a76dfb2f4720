"""End to end through the command line: the real SmolLM2 / MiniLM, a few steps each."""

import json
import re

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from tests.tiny_run import tiny_world  # noqa: F401 (fixture)

runner = CliRunner()

FAST = ["train.max_steps=2", "train.batch_size=2", "train.eval_every=null", "train.num_samples=1",
        "data.max_seq_length=48", "data.eval_max_examples=8", "data.max_examples=32"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_list_methods_json():
    result = invoke("list-methods", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["lora"]["mergeable"] is True and "paper" in rows["lora"]


def test_bad_recipe_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: lora\n  rr: 4\n")
    result = invoke("train", bad)
    assert result.exit_code == 2
    assert "unknown field `method.rr` (did you mean `r`?)" in result.output
    assert "Traceback" not in result.output


def test_unknown_override_field_exits_2():
    result = invoke("train", "recipes/quickstart.yaml", "train.max_step=3")
    assert result.exit_code == 2 and "did you mean `max_steps`" in result.output


@pytest.mark.slow
def test_quickstart_train_eval_merge(tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "recipes/quickstart.yaml", f"output_dir={run}", *FAST)
    assert result.exit_code == 0, result.output
    assert (run / "final" / "adapter.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["eval_tokens"] > 0
    assert "samples before training" in result.output and "samples after training" in result.output  # README
    assert re.search(r"^data: chatterbot \(chat\), 32 training examples, 8 held out$", result.stderr, re.M)

    again = invoke("train", "recipes/quickstart.yaml", f"output_dir={run}", *FAST)
    assert again.exit_code == 1 and "already holds a run" in again.output  # nothing overwritten
    assert "pass --resume to continue it, --overwrite to replace it, or choose another output_dir" in again.output

    result = invoke("eval", run, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], rel=1e-4)

    merged = tmp_path / "merged"
    result = invoke("merge", run, "--output", merged)
    assert result.exit_code == 0, result.output
    diff = float(result.stdout.split("adapter model:")[1].strip())
    assert diff < 1e-3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_resume_continues(tmp_path):
    run = tmp_path / "run"
    args = ["recipes/quickstart.yaml", f"output_dir={run}", *FAST, "train.max_steps=3", "train.save_every=1"]
    assert invoke("train", *args).exit_code == 0
    result = invoke("train", *args, "train.max_steps=4", "--resume")
    assert result.exit_code == 0, result.output
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


@pytest.mark.slow
def test_bbc_minilm_classification(tmp_path):
    run = tmp_path / "bbc"
    result = invoke("train", "recipes/bbc-news-minilm.yaml", f"output_dir={run}", "train.max_steps=2",
                    "train.batch_size=4", "data.max_seq_length=64", "data.eval_max_examples=20", "data.max_examples=40",
                    "train.eval_every=null")
    assert result.exit_code == 0, result.output
    after = json.loads((run / "summary.json").read_text())["after"]
    assert 0 <= after["accuracy"] <= 1 and "macro_f1" in after


def test_eval_does_not_compile(tmp_path, monkeypatch):
    """``lorakit eval`` of a run whose recipe compiles: one evaluation pass is not worth a compile."""
    import yaml

    from lorakit.fast import kernels
    from tests.test_quant import save_tiny

    save_tiny(tmp_path, texts=30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tmp_path)}, "method": {"name": "lora", "r": 4},
        "data": {"source": str(tmp_path / "data.jsonl"), "format": "text", "max_seq_length": 16},
        "train": {"max_steps": 2, "batch_size": 4, "num_samples": 0, "compile": True},
        "output_dir": str(tmp_path / "run")}))
    monkeypatch.setattr(kernels, "compile_layers", lambda model, mode=None: ["compile×2"])  # training: pretend
    assert invoke("train", recipe).exit_code == 0

    def refuse(model, mode=None):
        raise AssertionError("lorakit eval compiled the model")

    monkeypatch.setattr(kernels, "compile_layers", refuse)
    result = invoke("eval", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval_loss"] > 0


def test_eval_data_evaluates_all_of_the_file_and_says_how_many(tmp_path, tiny_world):
    """``lorakit eval RUN --data FILE``: every row of FILE (the count printed), --held-out: its split."""
    from tests.tiny_run import tiny_recipe, write_chat, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", train={"max_steps": 1}))
    assert invoke("train", recipe).exit_code == 0
    test_file = write_chat(tmp_path / "test.jsonl", n=20)
    result = invoke("eval", tmp_path / "run", "--data", test_file, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval_examples"] == 20
    assert f"evaluated 20 examples: all of {test_file}" in result.stderr
    held = invoke("eval", tmp_path / "run", "--data", test_file, "--held-out", "--json")
    assert json.loads(held.stdout)["eval_examples"] == 2  # data.eval_fraction 0.1 of 20
    assert "evaluated 2 examples: the held-out split of" in held.stderr
    own = invoke("eval", tmp_path / "run", "--json")
    assert json.loads(own.stdout)["eval_examples"] == 3 and "the held-out split of the run's data" in own.stderr


def test_eval_data_of_a_classifier_keeps_its_labels(tmp_path, tiny_world):
    """A classifier evaluated on a file with fewer (or other) classes: labels map onto the trained head's
    order, and a label it was not trained on is named, never silently mapped onto another class."""
    from tests.tiny_run import tiny_recipe, write_recipe

    rows = [{"text": f"Say hello number {i}.", "label": ["ant", "bee", "cat"][i % 3]} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_world, tmp_path / "run", model={"task": "seq_cls"}, train={"max_steps": 1},
        data={"source": str(tmp_path / "train.jsonl"), "format": "classification"}))
    assert invoke("train", recipe).exit_code == 0
    only_cats = [r for r in rows if r["label"] == "cat"]
    (tmp_path / "cats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in only_cats))
    result = invoke("eval", tmp_path / "run", "--data", tmp_path / "cats.jsonl", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["eval_examples"] == 8
    full = invoke("eval", tmp_path / "run", "--data", tmp_path / "train.jsonl", "--json")
    assert json.loads(full.stdout)["eval_examples"] == 24
    (tmp_path / "dogs.jsonl").write_text(json.dumps({"text": "Woof.", "label": "dog"}) + "\n")
    bad = invoke("eval", tmp_path / "run", "--data", tmp_path / "dogs.jsonl")
    assert bad.exit_code == 1 and "row 1 has label 'dog', which this classifier was not trained on" in bad.stderr
