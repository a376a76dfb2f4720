"""Pictures of runs with matplotlib: a run's curves (``<output_dir>/curves.png``, redrawn at each
checkpoint and at the end), several runs overlaid (``lorakit plot RUN...``), and ``compare``'s figure.

Everything is read from the run folder: ``metrics.jsonl`` (training records with ``loss``/``lr``,
evaluation records with ``eval_loss`` and ``accuracy``/``macro_f1``) and ``summary.json`` (its ``before``
evaluation is drawn at step 0 for a run older than the step-0 record of metrics.jsonl). Figures are built on :class:`matplotlib.figure.Figure` (no pyplot state,
no display needed) and written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.markup import escape

from lorakit.errors import LorakitError
from lorakit.files import normal_modes

PNG = "curves.png"
EVAL_KEYS = ("eval_loss", "accuracy", "macro_f1")  # drawn when present; perplexity is exp(eval_loss)


def _marked_step(value) -> int | None:
    """The integer ``step`` of a summary.json entry (``best``, ``stopped_early``), or None."""
    step = value.get("step") if isinstance(value, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_run(run_dir: Path) -> dict:
    """{"name", "method", "train": [records], "eval": [records], "best": step | None, "stopped": step | None}
    of a run folder (``best``: the best evaluation's step when its checkpoint was loaded at the end;
    ``stopped``: where early stopping ended it; from summary.json).

    Raises LorakitError when the folder has no metrics.jsonl or a line is not JSON or not a record (an
    object with an integer ``step``). A summary.json that cannot be read is left out."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise LorakitError(f"no such folder: {run_dir}" if not run_dir.exists() else f"{run_dir}: not a folder")
    if not path.is_file():
        raise LorakitError(f"{run_dir}: no metrics.jsonl (not a lorakit run folder, or nothing logged yet)")
    train, evals = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LorakitError(f"{path}, line {number}: not JSON") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise LorakitError(f"{path}, line {number}: not a metrics record (a JSON object with an integer step)")
        (train if "loss" in record else evals).append(record)
    summary = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(errors="replace"))
        except json.JSONDecodeError:
            summary = {}
    summary = summary if isinstance(summary, dict) else {}
    if isinstance(summary.get("before"), dict) and not any(r["step"] == 0 for r in evals):  # an older run
        evals.insert(0, {"step": 0, **summary["before"]})
    best = summary.get("best") if isinstance(summary.get("best"), dict) else {}
    return {"name": run_dir.name, "method": summary.get("method"), "train": train, "eval": evals,
            "best": _marked_step(best) if best.get("loaded_at_end") is True else None,
            "stopped": _marked_step(summary.get("stopped_early"))}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (the first ones over what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    normal_modes(tmp)
    os.replace(tmp, path)
    return path


def _figure(panels: int):
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.2 * panels, 4.0), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def _loss_panel(ax, run: dict, label: str | None = None, color=None) -> None:
    steps, loss = _series(run["train"], "loss")
    if steps:
        window = max(1, len(steps) // 20)
        if window > 1:
            ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(loss, window), color=color, linewidth=1.6,
                label=f"{label or ''} train{' (mean of ' + str(window) + ')' if window > 1 else ''}".strip())
    steps, loss = _series(run["eval"], "eval_loss")
    if steps:
        ax.plot(steps, loss, "o--", color=color, linewidth=1.2, markersize=4, label=f"{label or ''} held-out".strip())
    ax.set(title="loss", xlabel="optimizer step", ylabel="loss")


def plot_run(run_dir: Path, path: Path | None = None) -> Path:
    """Draw one run's training and held-out loss, learning rate and evaluation metrics into
    ``path`` (default ``<run_dir>/curves.png``). Raises LorakitError for a folder without metrics."""
    run = read_run(run_dir)
    metrics = [k for k in ("accuracy", "macro_f1") if _series(run["eval"], k)[0]]
    fig, axes = _figure(3 if metrics else 2)
    _loss_panel(axes[0], run, color="tab:blue")
    for step, style, label in ((run["best"], ":", "best, loaded at the end"), (run["stopped"], "-.", "stopped early")):
        if step is not None:  # train.load_best_at_end, train.early_stopping_patience
            axes[0].axvline(step, color="tab:green" if style == ":" else "tab:red", linestyle=style,
                            linewidth=1.2, label=f"{label} (step {step})")
    axes[0].legend(loc="upper right", fontsize=8)
    steps, lr = _series(run["train"], "lr")
    axes[1].plot(steps, lr, color="tab:orange")
    axes[1].set(title="learning rate", xlabel="optimizer step")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if metrics:
        for key in metrics:
            axes[2].plot(*_series(run["eval"], key), "o-", label=key)
        axes[2].set(title="held-out metrics", xlabel="optimizer step", ylim=(0, 1.02))
        axes[2].legend(loc="lower right", fontsize=8)
    name = Path(run_dir).resolve().name
    fig.suptitle(f"{name} ({run['method']})" if run["method"] else name)
    return _save(fig, Path(path) if path else Path(run_dir) / PNG)


def redraw(run_dir: Path, console) -> None:
    """:func:`plot_run` during training: a failure to draw is a warning line, never the end of the run."""
    try:
        plot_run(run_dir)
    except Exception as err:  # noqa: BLE001 - the run's own files are written already
        console.print(f"[yellow]warning:[/] no {PNG} for {escape(str(run_dir))}: {type(err).__name__}: {escape(str(err))}", markup=True,
                      highlight=False, soft_wrap=True)


def _label(run: dict, runs: list[dict]) -> str:
    methods = [r["method"] for r in runs]
    if run["method"] and methods.count(run["method"]) == 1:
        return run["method"]
    return run["name"] + (f" ({run['method']})" if run["method"] else "")


def _task(run: dict) -> str:
    """What a run's loss measures: a classifier's (its evaluations have accuracy) or a language model's."""
    return "classifier" if _series(run["eval"], "accuracy")[0] else "language model"


def figure_runs(runs: list[dict], title: str = "lorakit runs"):
    """The figure of :func:`plot_runs` for runs read by :func:`read_run`: a loss panel per kind of loss
    (a language model's and a classifier's are not comparable, so they never share a panel) and, when all
    runs are of one kind and have it, the final held-out metric per run as bars from 0."""
    tasks = list(dict.fromkeys(_task(r) for r in runs))
    final_key = next((k for k in ("accuracy", "eval_loss") if all(_series(r["eval"], k)[0] for r in runs)), None)
    final_key = final_key if len(tasks) == 1 else None
    fig, axes = _figure(len(tasks) + (1 if final_key else 0))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, task in zip(axes, tasks):
        mine = [(run, color) for run, color in zip(runs, colors) if _task(run) == task]
        for run, color in mine:
            _loss_panel(ax, run, _label(run, runs), color)
        ax.legend(loc="upper right", fontsize=7, ncol=2 if len(mine) > 4 else 1)
        if len(tasks) > 1:
            ax.set_title(f"loss of the {task} runs")
    if final_key:
        ax = axes[-1]
        finals = [_series(r["eval"], final_key)[1][-1] for r in runs]
        bars = ax.bar(range(len(runs)), finals, color=colors)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)  # close values: read the labels, the bars start at 0
        ax.set_xticks(range(len(runs)), [_label(r, runs) for r in runs], rotation=30, ha="right", fontsize=8)
        ax.set(title=f"final held-out {final_key}", ylabel=final_key)
        ax.set_ylim(0, max(max(finals), 1e-9) * 1.12)
    fig.suptitle(title)
    return fig


def plot_runs(run_dirs: list[Path], path: Path, title: str = "lorakit runs") -> Path:
    """Overlay several runs (:func:`figure_runs`) into ``path``. Raises LorakitError naming a folder
    without metrics."""
    return _save(figure_runs([read_run(d) for d in run_dirs], title), path)
