"""Adding a method is one file: a LoRA variant defined here, with its own scaling rule and recipe field,
registered, then trained, evaluated, merged, exported and resumed through the command line with no
change to ``lorakit/``."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import Field

from lorakit.methods import REGISTRY, LoraConfig, Method, register
from lorakit.methods.config import METHOD_FIELDS
from lorakit.methods.lora import LoraLayer
from lorakit.session import load_run
from tests.helpers_cli import invoke
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401 (tiny_world: a fixture)


class RootConfig(LoraConfig):
    """LoRA's fields plus ``root``: s = lora_alpha / r^(1/root)."""

    name: str = "lora_root"
    root: float = Field(4.0, gt=1, description="s = lora_alpha / r^(1/root)")


class RootLayer(LoraLayer):
    """LoRA with s = lora_alpha / r^(1/root): everything else (forward, merge, export) is LoRA's."""

    def __init__(self, base_layer, cfg: RootConfig):
        super().__init__(base_layer, cfg)
        self.scaling = cfg.lora_alpha / cfg.r ** (1 / cfg.root)


class RootLora(Method):
    name = "lora_root"
    paper = "a test method"
    trains = "lora_A, lora_B"
    config_class = RootConfig
    layer_class = RootLayer


@pytest.fixture
def registered():
    register(RootLora)
    yield RootLora
    REGISTRY.pop(RootLora.name)
    METHOD_FIELDS.pop(RootLora.name)


def _train(tmp_path, world, name: str, max_steps: int, *extra: str):
    data = tiny_recipe(world, tmp_path / name, method={"name": "lora_root", "r": 4, "lora_alpha": 8,
                                                       "root": 3, "lora_dropout": 0.0},
                       train={"max_steps": max_steps, "lr_scheduler": "constant"})
    recipe = write_recipe(tmp_path / f"{name}.yaml", data)
    result = invoke("train", recipe, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return recipe


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _difference(output: str) -> float:
    return float(re.search(r"logit difference\|[^:]*: ([0-9.e+-]+)", output).group(1))


def test_a_method_defined_in_one_file_runs_every_command(registered, tmp_path, tiny_world):
    recipe = _train(tmp_path, tiny_world, "run", 4)
    run = tmp_path / "run"
    session, _ = load_run(run)
    layer = next(iter(session.method.layers.values()))
    assert type(session.method) is RootLora and layer.scaling == pytest.approx(8 / 4 ** (1 / 3))
    after = json.loads((run / "summary.json").read_text())["after"]

    result = invoke("eval", run, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-6)

    result = invoke("merge", run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert _difference(result.stdout) < 1e-4

    result = invoke("export", run, "--output", tmp_path / "peft")
    assert result.exit_code == 0, result.output
    for who in ("reloaded by lorakit", "loaded by PEFT"):  # a LoRA with lora_alpha = s·r reproduces the scaling
        assert float(re.search(who + r"[^:]*: ([0-9.e+-]+)", result.stdout).group(1)) < 1e-4
    assert (run / "final" / "peft" / "adapter_config.json").is_file()

    _train(tmp_path, tiny_world, "cut", 2)  # the same run stopped at step 2, then resumed to 4
    result = invoke("train", tmp_path / "cut.yaml", "train.max_steps=4", "--resume")
    assert result.exit_code == 0, (result.output, result.exception)
    full, resumed = _losses(run), _losses(tmp_path / "cut")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7)
    assert recipe.is_file()


def test_the_field_of_a_method_is_validated_by_it(registered, tmp_path, tiny_world):
    data = tiny_recipe(tiny_world, tmp_path / "bad", method={"name": "lora_root", "root": 0.5})
    result = invoke("train", write_recipe(tmp_path / "bad.yaml", data))
    assert result.exit_code == 2 and "method.root" in result.output
