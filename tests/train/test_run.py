import json

import pytest

from lorakit.config import recipe_from_dict, recipe_to_dict
from lorakit.errors import LorakitError
from lorakit.train.run import check_resumable, keep_metrics_until


def recipe(**train):
    return recipe_to_dict(recipe_from_dict({"train": {"max_steps": 10, **train}}))


def test_resume_may_extend_but_not_change_the_optimization(tmp_path):
    check_resumable(recipe(), recipe(max_steps=20, eval_every=5), tmp_path)
    with pytest.raises(LorakitError, match=r"train\.learning_rate is 0\.1 here but 0\.0002"):
        check_resumable(recipe(), recipe(learning_rate=0.1), tmp_path)
    with pytest.raises(LorakitError, match=r"train\.batch_size"):
        check_resumable(recipe(), recipe(batch_size=3), tmp_path)


def test_precision_is_fixed_and_old_checkpoints_count_as_what_they_ran(tmp_path):
    with pytest.raises(LorakitError, match=r"train\.precision is 'fp32' here but 'auto'"):
        check_resumable(recipe(), recipe(precision="fp32"), tmp_path)
    old = recipe()
    del old["train"]["precision"]  # saved before the field existed: what auto means now
    check_resumable(old, recipe(), tmp_path)
    with pytest.raises(LorakitError, match=r"train\.precision"):
        check_resumable(old, recipe(precision="bf16"), tmp_path)


def test_metrics_after_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    keep_metrics_until(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
