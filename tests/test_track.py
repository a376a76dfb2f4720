"""train.report_to: each tracker gets the metrics.jsonl records and the recipe, read back with its own reader."""

import json
import os
import tempfile
import uuid

import pytest
from typer.testing import CliRunner

# trackio reads its store location when imported (only lorakit.track imports it, lazily)
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="lorakit-trackio-")

from lorakit import track  # noqa: E402
from lorakit.cli import app  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: E402,F401

RECORDS = [{"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 0.1, "grad_norm": 1.5, "tokens_per_s": 100.0},
           {"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 0.05, "grad_norm": None, "tokens_per_s": 120.0},
           {"step": 2, "eval_loss": 1.7, "perplexity": 5.47}]
RECIPE = {"method": {"name": "lora", "r": 4}, "train": {"project": "lorakit-tests", "run_name": None}}


def feed(names, run_dir, recipe=RECIPE):
    trackers = track.Trackers(names, run_dir, recipe)
    for record in RECORDS:
        trackers.log(record)
    trackers.finish()


def tensorboard_scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tag_values_split_training_and_evaluation():
    assert track.tag_values(RECORDS[0]) == (1, {"train/loss": 2.0, "train/lr": 0.1, "train/grad_norm": 1.5,
                                                "train/tokens_per_s": 100.0})
    assert track.tag_values(RECORDS[2]) == (2, {"eval/eval_loss": 1.7, "eval/perplexity": 5.47})


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    feed(["tensorboard"], tmp_path)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert scalars["eval/eval_loss"] == [(2, pytest.approx(1.7))]
    assert "train/grad_norm" in scalars and len(scalars["train/grad_norm"]) == 1  # None is not a number


def test_trackio_local_store_reads_back(tmp_path):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    recipe = {**RECIPE, "train": {"project": f"lorakit-{uuid.uuid4().hex[:8]}", "run_name": "first"}}
    feed(["trackio"], tmp_path, recipe)
    project = recipe["train"]["project"]
    logs = SQLiteStorage.get_logs(project, "first")
    assert [(r["step"], r.get("train/loss"), r.get("eval/eval_loss")) for r in logs] == \
        [(1, 2.0, None), (2, 1.5, None), (2, None, 1.7)]
    config = SQLiteStorage.get_run_config(project, "first")
    assert config["method"] == {"name": "lora", "r": 4}


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    feed(["wandb"], tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_mlflow_run_reads_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    feed(["mlflow"], tmp_path)
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("lorakit-tests").experiment_id])[0]
    assert run.data.params["method.r"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.loss")] == [(1, 2.0), (2, 1.5)]


def test_missing_tracker_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(track.importlib.util, "find_spec", lambda name: None)
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name_or_path": str(tmp_path / "no-such-model")},
                                                "train": {"report_to": "wandb"}, "output_dir": str(tmp_path / "run")})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 1
    assert "train.report_to: wandb is not installed; pip install 'lorakit[wandb]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_every_missing_tracker_is_named(monkeypatch):
    monkeypatch.setattr(track.importlib.util, "find_spec", lambda name: None if name != "wandb" else object())
    with pytest.raises(LorakitError, match=r"^train.report_to: tensorboard and trackio are not installed; pip "
                       r"install 'lorakit\[tensorboard,trackio\]' \(or pip install tensorboard trackio\)$"):
        track.check_installed(["tensorboard", "wandb", "trackio"])


def test_train_reports_what_metrics_jsonl_holds(tiny_world, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_world, run, train={"report_to": ["tensorboard"], "eval_every": 2})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run / "tensorboard")
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    assert scalars["eval/eval_loss"] == [(r["step"], pytest.approx(r["eval_loss"])) for r in records if "eval_loss" in r]
    before = json.loads((run / "summary.json").read_text())["before"]
    assert records[0] == {"step": 0, **before} and scalars["eval/eval_loss"][0][0] == 0  # the baseline too
