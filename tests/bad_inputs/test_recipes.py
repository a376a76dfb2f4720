"""Bad recipes and bad overrides: refused with one line naming the field (exit 2, or 1 for an output folder
that cannot be written), before any data, tokenizer or model loads, and with nothing written."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.bad_inputs.corpus import check_fails, no_loading  # noqa: F401 (fixture)
from tests.tiny_run import tiny_recipe, tiny_world  # noqa: F401 (fixture)
from tests.storage.test_runlock import held_by_another_process


def edit(section: str, **values):
    def apply(recipe: dict) -> dict:
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(recipe.get(section), dict) else values
        return recipe
    return apply


def top(key: str, value):
    def apply(recipe: dict) -> dict:
        recipe[key] = value
        return recipe
    return apply


def drop(section: str, key: str):
    def apply(recipe: dict) -> dict:
        recipe[section].pop(key)
        return recipe
    return apply


# (id, recipe: raw text or an edit of the valid tiny recipe, exit status, what the line must name)
RECIPES = [
    ("empty-file", "", 2, "empty"),
    ("only-comments", "# a recipe\n# nothing yet\n", 2, "empty"),
    ("empty-mapping", "{}\n", 2, "empty"),
    ("not-yaml", "model: [smollm2\n", 2, "not valid YAML"),
    ("a-list", "- model\n- method\n", 2, "expected a mapping"),
    ("a-string", "just some text\n", 2, "expected a mapping"),
    ("python-tag", "model: !!python/object/apply:os.system ['true']\n", 2, "not valid YAML"),
    ("not-utf8", b"model:\n  name_or_path: caf\xe9\n", 2, "UTF-8"),
    ("duplicate-key", "train:\n  max_steps: 3\n  max_steps: 4\n", 2, "max_steps"),
    ("duplicate-key-in-a-list", "method:\n  target_modules: [{a: 1, a: 2}]\n", 2, "`a` is given twice"),
    ("recursive-alias", "x: &x [1, *x]\n", 2, "unknown field `x`"),
    ("unknown-section", top("modle", {"task": "causal_lm"}), 2, "unknown field `modle`"),
    ("unknown-field", edit("method", rr=4), 2, "did you mean `r`"),
    ("method-unknown", edit("method", name="lorax"), 2, "lorax"),
    ("method-name-list", edit("method", name=["lora"]), 2, "method.name"),
    ("method-a-list", top("method", ["lora"]), 2, "method"),
    ("data-a-string", top("data", "file.jsonl"), 2, "data"),
    ("r-zero", edit("method", r=0), 2, "method.r"),
    ("r-negative", edit("method", r=-4), 2, "method.r"),
    ("r-words", edit("method", r="sixteen"), 2, "method.r"),
    ("r-fraction", edit("method", r=1.5), 2, "method.r"),
    ("alpha-inf", edit("method", lora_alpha=float("inf")), 2, "method.lora_alpha"),
    ("dropout-one", edit("method", lora_dropout=1.0), 2, "method.lora_dropout"),
    ("alias-conflict-r", edit("method", r=16, lora_r=4), 2, ("lora_r", "method.r", "conflict")),
    ("alias-conflict-alpha", edit("method", lora_alpha=8, alpha=4), 2, ("alpha", "lora_alpha", "conflict")),
    ("target-bad-regex", edit("method", target_modules="(["), 2, ("method.target_modules", "regex")),
    ("target-empty-list", edit("method", target_modules=[]), 2, "method.target_modules"),
    ("target-number", edit("method", target_modules=5), 2, "method.target_modules"),
    ("target-empty-name", edit("method", target_modules=["q_proj", ""]), 2, "method.target_modules"),
    ("lr-inf", edit("train", learning_rate=float("inf")), 2, "train.learning_rate"),
    ("lr-nan", edit("train", learning_rate=float("nan")), 2, "train.learning_rate"),
    ("lr-negative", edit("train", learning_rate=-1e-3), 2, "train.learning_rate"),
    ("epochs-inf", edit("train", num_epochs=float("inf"), max_steps=None), 2, "train.num_epochs"),
    ("max-steps-zero", edit("train", max_steps=0), 2, "train.max_steps"),
    ("batch-zero", edit("train", batch_size=0), 2, "train.batch_size"),
    ("warmup-above-one", edit("train", warmup_ratio=1.5), 2, "train.warmup_ratio"),
    ("scheduler-unknown", edit("train", lr_scheduler="exp"), 2, "train.lr_scheduler"),
    ("precision-fp8", edit("train", precision="fp8"), 2, "train.precision"),
    ("compile-maybe", edit("train", compile="maybe"), 2, "train.compile"),
    ("weight-decay-inf", edit("train", weight_decay=float("inf")), 2, "train.weight_decay"),
    ("seed-words", edit("train", seed="abc"), 2, "train.seed"),
    ("task-unknown", edit("model", task="regression"), 2, "model.task"),
    ("quantization-nf3", edit("model", quantization="nf3"), 2, "model.quantization"),
    ("qlora-unquantized", lambda r: {**edit("method", name="qlora")(r), "model": {**r["model"], "quantization": None}},
     2, "quantized"),
    ("format-unknown", edit("data", format="tabular"), 2, "data.format"),
    ("seq-cls-with-chat", edit("model", task="seq_cls"), 2, "data.format"),
    ("eval-fraction-zero", edit("data", eval_fraction=0), 2, "data.eval_fraction"),
    ("source-and-sources", edit("data", sources=["a.jsonl", "b.jsonl"]), 2, ("data.source and data.sources", "both")),
    ("no-source", edit("data", source=None), 2, ("data.source is null", "data.sources is empty")),
    ("sources-no-source", edit("data", source=None, sources=[{"weight": 2}]), 2, "data.sources[0].source is missing"),
    ("sources-weight-zero", edit("data", source=None, sources=["a.jsonl", {"source": "b.jsonl", "weight": 0}]), 2,
     "data.sources[1].weight = 0"),
    ("sources-unknown-field", edit("data", source=None, sources=[{"source": "a.jsonl", "wieght": 2}]), 2,
     ("data.sources[0].wieght", "did you mean `weight`")),
    ("sources-a-string", edit("data", source=None, sources="a.jsonl"), 2, "data.sources"),
    ("sources-format-typo", edit("data", source=None, sources=[{"source": "a.jsonl", "format": "sharegtp"}]), 2,
     ("data.sources[0].format", "sharegpt")),
    ("seq-length-zero", edit("data", max_seq_length=0), 2, "data.max_seq_length"),
    ("name-a-number", edit("model", name_or_path=5), 2, "model.name_or_path"),
    ("vera-unknown-field", edit("method", name="vera", rr=4), 2, "method.rr"),  # VeRA sets use_rslora aside (issue 18)
    ("lora-drop-fraction", edit("method", name="lora_drop", sample_fraction=2), 2, "sample_fraction"),
    ("delta-lambda-words", edit("method", name="delta_lora", delta_lambda="big"), 2, "delta_lambda"),
    ("output-dir-empty", top("output_dir", ""), 2, "output_dir"),
    ("save-total-limit-zero", edit("train", save_total_limit=0), 2, "train.save_total_limit"),
    ("metric-for-best-unknown", edit("train", metric_for_best="bleu"), 2,
     ("train.metric_for_best", "'bleu'", "eval_loss, perplexity")),
    ("metric-for-best-of-classification", edit("train", metric_for_best="accuracy"), 2,
     ("train.metric_for_best", "not a causal_lm metric")),
    ("load-best-without-eval", edit("train", load_best_at_end=True), 2, ("train.load_best_at_end", "train.eval_every")),
    ("patience-without-eval", edit("train", early_stopping_patience=3), 2,
     ("train.early_stopping_patience", "train.eval_every")),
    ("patience-zero", edit("train", early_stopping_patience=0, eval_every=2), 2, "train.early_stopping_patience"),
    ("threshold-negative", edit("train", early_stopping_threshold=-0.1), 2, "train.early_stopping_threshold"),
    ("greater-is-better-words", edit("train", greater_is_better="sometimes"), 2, "train.greater_is_better"),
]


def _write(tmp_path, tiny_world, recipe) -> object:
    path = tmp_path / "recipe.yaml"
    if isinstance(recipe, (str, bytes)):
        path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    else:
        path.write_text(yaml.safe_dump(recipe(tiny_recipe(tiny_world, tmp_path / "run")), sort_keys=False))
    return path


@pytest.mark.parametrize("case, recipe, code, expect", RECIPES, ids=[c[0] for c in RECIPES])
def test_bad_recipe(tmp_path, tiny_world, no_loading, case, recipe, code, expect):
    path = _write(tmp_path, tiny_world, recipe)
    line = check_fails(["train", path], code, expect, [tmp_path])
    assert str(path) in line or "recipe" in line


# (id, overrides on the valid tiny recipe, exit status, what the line must name)
OVERRIDES = [
    ("no-equals", ["train.max_steps"], 2, "KEY=VALUE"),
    ("empty-key", ["=3"], 2, "KEY=VALUE"),
    ("empty-part", ["train..max_steps=3"], 2, "train..max_steps"),
    ("unknown-field", ["train.max_step=3"], 2, "did you mean `max_steps`"),
    ("into-a-value", ["train.max_steps.x=3"], 2, "max_steps"),
    ("section-to-scalar", ["model=foo"], 2, "model"),
    ("lr-inf-word", ["train.learning_rate=inf"], 2, "train.learning_rate"),
    ("lr-inf-yaml", ["train.learning_rate=.inf"], 2, "train.learning_rate"),
    ("epochs-inf", ["train.num_epochs=.inf", "train.max_steps=null"], 2, "train.num_epochs"),
    ("bad-regex", ["method.target_modules=(["], 2, "method.target_modules"),
    ("alias-conflict", ["method.lora_r=4", "method.r=8"], 2, "conflict"),
    ("unclosed-list", ["train.batch_size=[1"], 2, "train.batch_size"),
    ("huge-number", ["train.learning_rate=1e400"], 2, "train.learning_rate"),
    ("brackets-kept", ["method.name=[lora]x"], 2, "[lora]x"),
    ("source-over-a-mix", ["data.source=null", "data.sources=[a.jsonl]", "data.source=b.jsonl"], 2,
     "data.source and data.sources"),
    ("output-under-proc", ["output_dir=/proc/lorakit-run"], 1, ("output_dir", "/proc/lorakit-run")),
]


@pytest.mark.parametrize("case, overrides, code, expect", OVERRIDES, ids=[c[0] for c in OVERRIDES])
def test_bad_override(tmp_path, tiny_world, no_loading, case, overrides, code, expect):
    path = _write(tmp_path, tiny_world, lambda r: r)
    check_fails(["train", path, *overrides], code, expect, [tmp_path])


def test_output_dir_that_is_a_file(tmp_path, tiny_world, no_loading):
    path = _write(tmp_path, tiny_world, lambda r: r)
    (tmp_path / "taken").write_text("my notes")
    check_fails(["train", path, f"output_dir={tmp_path / 'taken'}"], 1, ("output_dir", "not a folder"), [tmp_path])


def test_output_dir_under_a_file(tmp_path, tiny_world, no_loading):
    path = _write(tmp_path, tiny_world, lambda r: r)
    (tmp_path / "taken").write_text("my notes")
    check_fails(["train", path, f"output_dir={tmp_path / 'taken' / 'run'}"], 1, "output_dir", [tmp_path])


def test_recipe_path_missing_or_a_folder(tmp_path, no_loading):
    check_fails(["train", tmp_path / "nope.yaml"], 2, "not found", [tmp_path])
    check_fails(["train", tmp_path], 2, "not found", [tmp_path])


def test_overwrite_with_resume(tmp_path, tiny_world, no_loading):
    path = _write(tmp_path, tiny_world, lambda r: r)
    check_fails(["train", path, "--overwrite", "--resume"], 2, ("--overwrite and --resume", "one of them"), [tmp_path])


def test_overwrite_of_a_folder_that_is_no_run(tmp_path, tiny_world, no_loading):
    path = _write(tmp_path, tiny_world, lambda r: r)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    (tmp_path / "mine" / "metrics.jsonl").write_text("{}\n")
    check_fails(["train", path, f"output_dir={tmp_path / 'mine'}", "--overwrite"], 1,
                ("--overwrite", "does not look like a lorakit run folder", "notes.txt"), [tmp_path])


@pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]])
def test_a_run_folder_in_use_by_another_process(tmp_path, tiny_world, no_loading, flag):
    path = _write(tmp_path, tiny_world, lambda r: r)
    run = tmp_path / "live"
    with held_by_another_process(run) as pid:
        (run / "metrics.jsonl").write_text('{"step": 0}\n')
        check_fails(["train", path, f"output_dir={run}", *flag], 1,
                    (f"output_dir {run} is in use by another lorakit process (PID {pid})",), [tmp_path])


@pytest.mark.parametrize("name", ["checkpoints", "final"])
def test_a_linked_checkpoints_folder(tmp_path, tiny_world, no_loading, name):
    path = _write(tmp_path, tiny_world, lambda r: r)
    (tmp_path / "bigdisk").mkdir()
    (tmp_path / "lnk").mkdir()
    os.symlink(tmp_path / "bigdisk", tmp_path / "lnk" / name)
    check_fails(["train", path, f"output_dir={tmp_path / 'lnk'}"], 1, (f"{name}/ is a link", "other disk"), [tmp_path])


def test_overwrite_of_a_folder_of_lightning_checkpoints(tmp_path, tiny_world, no_loading):
    path = _write(tmp_path, tiny_world, lambda r: r)
    (tmp_path / "foreign" / "checkpoints").mkdir(parents=True)
    (tmp_path / "foreign" / "checkpoints" / "epoch=9.ckpt").write_text("weights")
    check_fails(["train", path, f"output_dir={tmp_path / 'foreign'}", "--overwrite"], 1,
                ("does not look like a lorakit run folder", "checkpoints/epoch=9.ckpt"), [tmp_path])
