"""Output off a terminal, third-party noise, and the command-line help."""

import io
import os
import subprocess
import sys
import warnings

from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from lorakit import output
from lorakit.cli import app
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401


def test_plain_progress_prints_every_n_steps_and_the_last():
    buffer = io.StringIO()
    progress = output.PlainProgress(Console(file=buffer, width=200), every=4, seconds=1e9)
    with progress:
        task = progress.add_task("train", total=10, completed=0, info="")
        for step in range(1, 11):
            progress.update(task, info=f"loss {1 / step:.2f}")
            progress.update(task, completed=step)
    lines = buffer.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "loss 0.25" in lines[0] and "eta" in lines[0] and "\x1b" not in buffer.getvalue()


def test_log_console_keeps_plain_lines_whole_off_a_terminal():
    buffer = io.StringIO()
    console = output.LogConsole(file=buffer, width=80)
    path = "/shared/runs/" + "a-very-long-folder-name-for-my-experiment-" * 3 + "v1/final"
    console.print(f"Saved {path} and {path}")
    table = Table(title="held-out metrics")
    table.add_column("metric")
    table.add_column("value")
    table.add_row("note", "word " * 40)
    console.print(table)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == f"Saved {path} and {path}"
    assert max(len(line) for line in lines[1:]) <= 80  # a table still fits the width
    wrapped = io.StringIO()
    output.LogConsole(file=wrapped, width=80, force_terminal=True).print(f"Saved {path}", highlight=False)
    assert len(wrapped.getvalue().splitlines()) > 1  # a terminal wraps as rich does


def test_progress_is_plain_off_a_terminal():
    assert isinstance(output.progress_for(Console(file=io.StringIO()), 100, []), output.PlainProgress)
    assert not isinstance(output.progress_for(Console(force_terminal=True), 100, []), output.PlainProgress)


def test_quiet_keeps_the_users_own_settings(monkeypatch):
    for key in output.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    with warnings.catch_warnings():
        output.quiet_third_party(verbose=False)
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    monkeypatch.delenv("TQDM_DISABLE")
    output.quiet_third_party(verbose=True)
    assert "TQDM_DISABLE" not in os.environ


def test_help_has_no_type_tags_or_braces():
    runner = CliRunner()
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "100"}).output
    assert "<bool>" not in text and "{recipe}" not in text and "RECIPE [OVERRIDES]..." in text
    assert runner.invoke(app, ["--version"]).output.startswith("lorakit ")


def test_list_methods_never_cuts_a_hook_name():
    text = CliRunner().invoke(app, ["list-methods"]).output
    assert "after_optimizer_step" in text and "…" not in text and "merge" in text


def test_training_off_a_terminal_prints_plain_lines_and_no_third_party_bars(tiny_world, tmp_path):
    """A real process with stdout/stderr to a pipe, as under nohup or CI."""
    run = tmp_path / "a-rather-long-folder-name-for-the-eval-title" / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 4}))
    cli = [sys.executable, "-c", "from lorakit.cli import main; main()"]
    env = {k: v for k, v in os.environ.items() if k not in output.QUIET_ENV and k != "COLUMNS"}
    done = subprocess.run([*cli, "train", str(recipe)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "train step 4/4 (100%)" in text
    assert "Loading weights" not in text and "it/s]" not in text and "\x1b[" not in text
    assert f"Saved {run / 'checkpoints' / 'step-000004'} and {run / 'final'}\n" in text  # never cut at 80 columns
    shown = subprocess.run([*cli, "eval", str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert f"eval of {run / 'final'}" in shown.stdout  # the path whole, on its own line


def test_help_reads_cleanly_at_80_columns():
    """No reST double backticks, nothing cut with an ellipsis, no [markup] eaten, on every command's help."""
    from lorakit.cli import app as cli_app

    runner = CliRunner()
    for name in [None] + [c.name or c.callback.__name__ for c in cli_app.registered_commands]:
        text = runner.invoke(cli_app, ([name] if name else []) + ["--help"], env={"COLUMNS": "80"}).output
        assert "``" not in text and "…" not in text, (name, text)
        assert max(len(line) for line in text.splitlines()) <= 80, name


def test_quiet_silences_other_libraries_log_lines_and_bars(capsys, monkeypatch):
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as outside pytest (which adds its capture handlers)
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    logging.getLogger("some.library").warning("Failed to load a kernel")  # Python's last-resort handler
    assert "Failed to load a kernel" in capsys.readouterr().err
    output.quiet_third_party(verbose=False)
    logging.getLogger("some.library").warning("Failed to load a kernel")
    assert capsys.readouterr().err == ""
    assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
