import json
from pathlib import Path

import yaml

import pytest

from rich.console import Console

from lorakit import compare as cmp
from lorakit.config import load_recipe, recipe_to_dict
from lorakit.errors import LorakitError, RecipeError
from tests.tiny_run import tiny_world  # noqa: F401


def test_compare_trains_unfinished_runs_only(tmp_path, monkeypatch):
    recipes = []
    for name in ("lora", "dora"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"method: {{name: {name}}}\noutput_dir: {tmp_path / name}\n")
        recipes.append(path)
    trained = []

    def fake_run(path, overrides, resume, console, verbose=False):
        out = tmp_path / path.stem
        out.mkdir()
        recipe = recipe_to_dict(load_recipe(path, overrides))
        (out / "summary.json").write_text(json.dumps({"recipe": recipe,
            "trainable_parameters": 10, "seconds_per_step": 0.5, "after": {"eval_loss": 1.5, "perplexity": 4.48}}))
        trained.append(path.stem)

    monkeypatch.setattr(cmp, "run_training", fake_run)
    rows = cmp.compare(recipes, [], Console(quiet=True))
    assert trained == ["lora", "dora"] and [r["method"] for r in rows] == ["lora", "dora"]
    rows = cmp.compare(recipes, [], Console(quiet=True))  # finished runs are not trained again
    assert trained == ["lora", "dora"]
    md = cmp.markdown(rows)
    assert "| lora |" in md and "1.5000" in md and "perplexity" in md
    with pytest.raises(LorakitError, match="holds a finished run of another recipe"):
        cmp.compare(recipes, ["train.max_steps=7"], Console(quiet=True))  # stale numbers are never reused


def test_compare_rejects_a_shared_output_dir(tmp_path):
    paths = []
    for name in ("lora", "dora"):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(f"method: {{name: {name}}}\n")
    with pytest.raises(LorakitError, match="shared with another recipe"):
        cmp.compare(paths, [], Console(quiet=True))


def test_compare_command_draws_the_runs(tiny_world, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app
    from tests.tiny_run import tiny_recipe, write_recipe

    paths = [write_recipe(tmp_path / f"{m}.yaml", tiny_recipe(tiny_world, tmp_path / "runs" / m, method={"name": m}))
             for m in ("lora", "dora")]
    result = CliRunner().invoke(app, ["compare", *map(str, paths), "--set", "train.max_steps=2", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| dora |" in result.output
    assert (tmp_path / "runs" / "compare.png").stat().st_size > 10_000


SHIPPED = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_under_every_method(recipe):
    from lorakit.methods import REGISTRY

    for name in REGISTRY:
        assert load_recipe(recipe, [f"method.name={name}"]).method.name == name


def test_one_recipe_trains_under_all_nine_methods(tiny_world, tmp_path):
    """The quickstart's method fields (r 16, lora_alpha 32, dropout 0.05, q/k/v/o) in one recipe,
    ``--methods all``: every method trains a step into OUTPUT_DIR-METHOD; Delta-LoRA's dropout and VeRA's
    lora_alpha are set aside."""
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.methods import REGISTRY
    from tests.tiny_run import tiny_recipe, write_recipe

    quick = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
    path = write_recipe(tmp_path / "quick.yaml", tiny_recipe(tiny_world, tmp_path / "runs" / "quick",
                                                             method=quick["method"]))
    result = CliRunner().invoke(app, ["compare", str(path), "--methods", "all", "--set", "train.max_steps=1",
                                      "--markdown"])
    assert result.exit_code == 0, result.output
    assert all(f"| {m} |" in result.output for m in REGISTRY)
    assert all((tmp_path / "runs" / f"quick-{m}" / "summary.json").is_file() for m in REGISTRY)
    assert not (tmp_path / "runs" / "quick").exists()
    assert "method.lora_dropout = 0.05 set aside" in result.output and "method.lora_alpha = 32 set aside" in result.output


def test_methods_option_names_runs_and_refuses_unknown_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: {name: lora, r: 4}\noutput_dir: runs/007\n")
    assert cmp.parse_methods(None) is None
    assert cmp.parse_methods("dora, vera") == ["dora", "vera"]
    from lorakit.methods import REGISTRY

    assert cmp.parse_methods("all") == list(REGISTRY)
    jobs = cmp.jobs([path], ["train.max_steps=2"], ["dora", "lora"])
    assert [load_recipe(p, o).output_dir for p, o in jobs] == ["runs/007-dora", "runs/007-lora"]
    assert [load_recipe(p, o).method.name for p, o in jobs] == ["dora", "lora"]
    assert load_recipe(*jobs[0]).method.r == 4 and load_recipe(*jobs[0]).train.max_steps == 2
    with pytest.raises(RecipeError, match=r"^--methods: 'doar' is not a method \(did you mean `dora`\?\)"):
        cmp.parse_methods("lora,doar")
    with pytest.raises(RecipeError, match="named twice"):
        cmp.parse_methods("lora,lora")
    with pytest.raises(RecipeError, match="'' is not a method"):
        cmp.parse_methods("lora,")


@pytest.mark.parametrize("text", [b"{oops", b"[1, 2]", b"\xff"])
def test_a_damaged_summary_is_one_line(tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_bytes(text)
    path = tmp_path / "lora.yaml"
    path.write_text(f"method: {{name: lora}}\noutput_dir: {tmp_path / 'run'}\n")
    with pytest.raises(LorakitError, match=r"run/summary.json: not a valid summary.json"):
        cmp.compare([path], [], Console(quiet=True))
