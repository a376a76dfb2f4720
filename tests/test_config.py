import pytest

from lorakit.config import load_recipe, recipe_from_dict
from lorakit.errors import RecipeError


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "method:\n  name: lora\n  r: 4\ntrain:\n  max_steps: 5\n")
    r = load_recipe(path, ["train.max_steps=20", "output_dir=runs/x", "method.r=16", "method.target_modules=[q_proj, v_proj]"])
    assert r.train.max_steps == 20 and r.output_dir == "runs/x" and r.method.r == 16
    assert r.method.target_modules == ["q_proj", "v_proj"]
    assert r.method.scaling == pytest.approx(1.0)


@pytest.mark.parametrize("text,pattern", [
    ("method:\n  r: -1\n", r"method\.r = -1 is invalid: .*greater than 0"),
    ("train:\n  learning_rat: 0.1\n", r"unknown field `train\.learning_rat` \(did you mean `learning_rate`\?\)"),
    ("method:\n  lora_alpah: 3\n", r"did you mean `lora_alpha`"),
    ("train:\n  lr_scheduler: cosin\n", r"train\.lr_scheduler = 'cosin' is invalid: expected 'linear', 'cosine' or 'constant'"),
    ("method:\n  name: lorra\n", r"method\.name = 'lorra' is not a method \(did you mean `lora`\?\)"),
    ("modle:\n  name_or_path: x\n", r"unknown field `modle` \(did you mean `model`\?\)"),
    ("- a\n- b\n", r"expected a mapping"),
    ("a: [\n", r"not valid YAML"),
    ("method: lora\n", r"method = 'lora' is invalid: expected a mapping"),
    ("method: {name: [x]}\n", r"method.name must be a method name"),
])
def test_errors_name_the_field(tmp_path, text, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_override():
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        from lorakit.config import apply_overrides

        apply_overrides({}, ["train.max_steps"])


def test_task_format_mismatch():
    with pytest.raises(RecipeError, match="needs model.task causal_lm"):
        recipe_from_dict({"model": {"task": "seq_cls"}, "data": {"format": "chat"}})


def test_peer_aliases_and_no_clipping():
    r = recipe_from_dict({"method": {"lora_r": 4, "alpha": 8, "dropout": 0.0}, "train": {"max_grad_norm": 0}})
    assert (r.method.r, r.method.lora_alpha, r.method.lora_dropout) == (4, 8.0, 0.0)
    assert r.train.max_grad_norm is None
    from lorakit.config import recipe_to_dict

    assert recipe_to_dict(r)["method"]["r"] == 4  # saved under the standard name, reloads the same
    assert recipe_from_dict(recipe_to_dict(r)).method.r == 4


def test_metric_for_best_is_named_as_metrics_jsonl_writes_it_and_sets_the_direction():
    from lorakit.config import recipe_from_dict

    cls = {"model": {"task": "seq_cls"}, "data": {"format": "classification"}}
    train = recipe_from_dict({**cls, "train": {"metric_for_best": "eval_accuracy"}}).train
    assert (train.metric_for_best, train.greater_is_better) == ("accuracy", True)
    train = recipe_from_dict({**cls, "train": {"metric_for_best": "macro_f1", "greater_is_better": False}}).train
    assert (train.metric_for_best, train.greater_is_better) == ("macro_f1", False)  # said explicitly: kept
    train = recipe_from_dict({"train": {"metric_for_best": "eval_perplexity"}}).train
    assert (train.metric_for_best, train.greater_is_better) == ("perplexity", False)
    assert recipe_from_dict({}).train.greater_is_better is False
