"""Run pictures: one run's curves, several runs overlaid, drawn during training and by the CLI."""

import json
import stat

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from lorakit import plot
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.files import current_umask
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401


def fake_run(folder, method="lora", classification=False, steps=30):
    folder.mkdir(parents=True)
    lines = [{"step": s, "epoch": s / steps, "loss": 3.0 / s, "lr": 1e-3 * (1 - s / steps), "grad_norm": 1.0}
             for s in range(1, steps + 1)]
    for s in (10, 20, 30):
        lines.append({"step": s, "eval_loss": 2.0 / s, **({"accuracy": s / 40, "macro_f1": s / 45} if classification else {})})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = {"eval_loss": 3.5, **({"accuracy": 0.2, "macro_f1": 0.1} if classification else {})}
    (folder / "summary.json").write_text(json.dumps({"method": method, "before": before}))
    return folder


def is_png(path, width_at_least):
    image = imread(path)
    return image.ndim == 3 and image.shape[1] >= width_at_least


def test_read_run_puts_the_before_evaluation_at_step_0(tmp_path):
    run = plot.read_run(fake_run(tmp_path / "a"))
    assert run["method"] == "lora" and len(run["train"]) == 30
    assert [r["step"] for r in run["eval"]] == [0, 10, 20, 30]


@pytest.mark.parametrize("classification", [False, True])
def test_plot_run_draws_a_png_readable_by_all(tmp_path, classification):
    path = plot.plot_run(fake_run(tmp_path / "a", classification=classification))
    assert path == tmp_path / "a" / "curves.png"
    assert is_png(path, 1000 if not classification else 1600)  # 2 panels, or 3 with accuracy / F1
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()  # a normal file's mode


def test_the_best_loaded_and_an_early_stop_are_marked(tmp_path):
    run = fake_run(tmp_path / "a")
    summary = json.loads((run / "summary.json").read_text())
    summary.update(best={"step": 20, "metric": "eval_loss", "value": 0.1, "loaded_at_end": True},
                   stopped_early={"step": 30, "reason": "..."})
    (run / "summary.json").write_text(json.dumps(summary))
    read = plot.read_run(run)
    assert (read["best"], read["stopped"]) == (20, 30)
    assert is_png(plot.plot_run(run), 1000)
    summary.update(best={"step": 20, "loaded_at_end": False}, stopped_early={"step": "30"})  # not loaded; not a step
    (run / "summary.json").write_text(json.dumps(summary))
    assert (plot.read_run(run)["best"], plot.read_run(run)["stopped"]) == (None, None)


def test_plot_runs_overlays_and_compares(tmp_path):
    runs = [fake_run(tmp_path / m, method=m, classification=True) for m in ("lora", "dora", "vera")]
    path = plot.plot_runs(runs, tmp_path / "out" / "all.png")
    assert is_png(path, 1000)


def test_bars_start_at_0_and_two_kinds_of_loss_never_share_a_panel(tmp_path):
    lm = plot.read_run(fake_run(tmp_path / "lm"))
    other = plot.read_run(fake_run(tmp_path / "lm2", method="dora"))
    axes = plot.figure_runs([lm, other]).axes
    assert axes[1].get_title() == "final held-out eval_loss" and axes[1].get_ylim()[0] == 0  # never cut
    classifier = plot.read_run(fake_run(tmp_path / "cls", classification=True))
    axes = plot.figure_runs([lm, classifier]).axes  # a language model's loss and a classifier's
    assert [a.get_title() for a in axes] == ["loss of the language model runs", "loss of the classifier runs"]
    assert [len(a.get_lines()) for a in axes] == [2, 2]  # train and held-out of one run each, no bars


def test_bad_run_folders_are_one_line(tmp_path):
    with pytest.raises(LorakitError, match="no metrics.jsonl"):
        plot.read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n')
    with pytest.raises(LorakitError, match=r"metrics.jsonl, line 2: not JSON"):
        plot.read_run(tmp_path)
    for bad in ("[1, 2]", "3", '{"loss": 1}', '{"step": "1", "loss": 1}'):  # valid JSON, not a record
        (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 1}}\n{bad}\n')
        with pytest.raises(LorakitError, match=r"metrics.jsonl, line 2: not a metrics record"):
            plot.read_run(tmp_path)


def test_a_summary_that_is_not_an_object_is_left_out(tmp_path):
    run = fake_run(tmp_path / "a")
    (run / "summary.json").write_bytes(b"[1, 2]")
    assert plot.read_run(run)["method"] is None and [r["step"] for r in plot.read_run(run)["eval"]] == [10, 20, 30]
    (run / "summary.json").write_bytes(b"\xff\xfe")
    assert plot.read_run(run)["method"] is None


def test_plot_command(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", method="dora")
    runner = CliRunner()
    assert runner.invoke(app, ["plot", str(a)]).exit_code == 0 and (a / "curves.png").is_file()
    result = runner.invoke(app, ["plot", str(a), str(b), "-o", str(tmp_path / "ab.png")])
    assert result.exit_code == 0 and is_png(tmp_path / "ab.png", 1000)
    one = runner.invoke(app, ["plot", str(a), "-o", str(tmp_path / "a.png")])  # -o changes only the place
    assert one.exit_code == 0 and (tmp_path / "a.png").read_bytes() == (a / "curves.png").read_bytes()
    missing = runner.invoke(app, ["plot", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such folder: " in missing.output
    (tmp_path / "nope").mkdir()
    empty = runner.invoke(app, ["plot", str(tmp_path / "nope")])
    assert empty.exit_code == 1 and "no metrics.jsonl" in empty.output


def test_training_redraws_at_each_checkpoint_and_the_end(tiny_world, tmp_path, monkeypatch):
    drawn = []
    real = plot.plot_run
    monkeypatch.setattr(plot, "plot_run", lambda run_dir, path=None: drawn.append(run_dir) or real(run_dir, path))
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_world, run, train={"max_steps": 4, "save_every": 2})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert len(drawn) == 3  # checkpoints at steps 2 and 4, then the end (with the final evaluation)
    assert is_png(run / "curves.png", 1000)
