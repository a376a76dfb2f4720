"""The recipe reference is generated from the schema, documents every field, and is what the README shows."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit import reference
from lorakit.cli import app
from lorakit.config import Recipe, load_recipe

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- BEGIN lorakit recipe --markdown -->\n", "<!-- END lorakit recipe --markdown -->"


def test_readme_reference_is_the_generated_one():
    text = README.read_text()
    shown = text[text.index(BEGIN) + len(BEGIN): text.index(END)]
    assert shown == reference.markdown(), "README recipe reference drifted: run python scripts/readme_reference.py"


@pytest.mark.parametrize("section", reference.SECTIONS)
def test_every_shared_field_has_a_description(section):
    model = Recipe.model_fields[section].annotation
    assert [d.name for d in reference.section_docs(model) if not d.description] == []


@pytest.mark.parametrize("method", sorted(reference.method_classes()))
def test_every_method_field_has_a_description(method):
    config = reference.method_classes()[method]
    assert [d.name for d in reference.section_docs(config) if not d.description] == []


@pytest.mark.parametrize("method", sorted(reference.method_classes()))
def test_commented_recipe_validates_to_the_defaults(method, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(reference.commented_recipe(method))
    assert load_recipe(path) == Recipe.model_validate({"method": {"name": method}})


def test_reference_states_real_defaults_and_allowed_values():
    text = reference.markdown()
    assert "| `method.r` | int > 0 | `8` |" in text
    assert "| `train.lr_scheduler` | linear \\| cosine \\| constant | `linear` |" in text
    assert "| `vera` | `r` | int > 0 | `256` |" in text  # a method's changed default


def test_recipe_command_prints_a_recipe_and_rejects_unknown_methods():
    runner = CliRunner()
    result = runner.invoke(app, ["recipe", "--method", "dora"])
    assert result.exit_code == 0 and "  name: dora\n" in result.stdout
    bad = runner.invoke(app, ["recipe", "--method", "lroa"])
    assert bad.exit_code == 2 and "did you mean `lora`" in bad.output


def test_readme_names_every_field_a_resume_may_change():
    from lorakit.train.run import RESUMABLE_CHANGES

    text = README.read_text()
    start = text.index("`--resume` checks the recipe against the checkpoint's")
    said = text[start: text.index("anything else is refused", start)].replace("`_threshold`", "`early_stopping_threshold`")
    assert [f for f in sorted(RESUMABLE_CHANGES) if f"`{f.split('.')[-1]}`" not in said] == []
