"""``lorakit train``: recipe → session → before/after metrics and samples → checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from lorakit import plot, track
from lorakit.config import load_recipe, recipe_to_dict
from lorakit.errors import LorakitError
from lorakit.evaluate import generate_samples
from lorakit.precision import recipe_precision
from lorakit.session import Checkpoint, load_session, parameter_table, recipe_weights
from lorakit.storage import checkpoint as ckpt
from lorakit.train.loop import Trainer


def _summary_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _samples(session, console: Console, title: str) -> None:
    prompts = session.data.sample_prompts[: session.recipe.train.num_samples]
    if not prompts:
        return
    answers = generate_samples(session.model, session.tokenizer, prompts, session.device,
                               precision=recipe_precision(session.recipe, session.device))
    console.print(f"[bold]{title}[/]")
    for prompt, answer in zip(prompts, answers):
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        console.print(f"  [cyan]Q:[/] {question}\n  [green]A:[/] {answer}", highlight=False)


# Fields a resumed run may change: they do not alter the batches, the optimizer or the schedule seen so far.
RESUMABLE_CHANGES = {"train.max_steps", "train.num_epochs", "train.eval_every", "train.save_every",
                     "train.log_every", "train.num_samples", "train.eval_batch_size",
                     "train.cross_entropy", "train.kernels", "train.compile",  # these three: speed only
                     "train.report_to", "train.project", "train.run_name"}  # tracking only


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse a resume whose recipe differs from the checkpoint's beyond ``RESUMABLE_CHANGES``.

    Raises LorakitError naming the first differing field and both values.
    """
    old, new = _flatten(saved), _flatten(current)
    old.setdefault("train.precision", "auto")  # saved before the field existed: auto's bf16 on CUDA, fp32 on CPU
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            raise LorakitError(
                f"--resume: {key} is {new.get(key)!r} here but {old.get(key)!r} in {checkpoint}/recipe.yaml; "
                f"a resumed run may change only {', '.join(sorted(RESUMABLE_CHANGES))}"
            )


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (by a run that stopped after its last checkpoint)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        ckpt.write_atomic_text(path, "".join(line + "\n" for line in lines))


def run_training(recipe_path: Path, overrides: list[str], resume: bool, console: Console,
                 verbose: bool = False) -> dict:
    """Validate the recipe, train, and write the run folder. Returns the final metrics.

    Raises:
        RecipeError: the recipe is invalid (before any model loads).
        LorakitError: the output folder already holds a run and ``resume`` is off, or ``resume`` is
            on and there is no checkpoint.
    """
    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(recipe.output_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if resume:
        if latest is None:
            raise LorakitError(f"--resume: output_dir {run_dir} has no checkpoint to resume from")
        saved_recipe, _ = ckpt.read_checkpoint_meta(latest)
        check_resumable(saved_recipe, recipe_to_dict(recipe), latest)
        step = json.loads((latest / "trainer.json").read_text())["step"]
        keep_metrics_until(run_dir / "metrics.jsonl", step)
    elif any((run_dir / name).exists() for name in ("checkpoints", "final", "metrics.jsonl", "summary.json")):
        raise LorakitError(
            f"output_dir {run_dir} already holds a run; pass --resume to continue it, or choose another "
            f"output_dir (e.g. output_dir={run_dir}-2)"
        )
    track.check_installed(recipe.train.report_to)  # a missing tracker fails before the model loads
    session = load_session(recipe, Checkpoint(latest) if resume else recipe_weights(recipe), console)
    console.print(parameter_table(session.model, session.method))
    trainer = Trainer(session.model, session.tokenizer, session.method, session.data, recipe,
                      session.device, console)
    run_dir.mkdir(parents=True, exist_ok=True)
    before = None
    if resume and (run_dir / "summary.json").is_file():
        before = json.loads((run_dir / "summary.json").read_text()).get("before")
    if not resume:
        before = trainer.evaluate()
        ckpt.write_atomic_text(run_dir / "summary.json", json.dumps({"before": before}, indent=1))
        console.print(f"before training: {_summary_line(before)}")
        _samples(session, console, "samples before training")
    start_step = step if resume else 0
    trackers = track.Trackers(recipe.train.report_to, run_dir, recipe_to_dict(recipe), start_step, verbose)
    trainer.on_record.append(trackers.log)
    trainer.on_checkpoint.append(lambda _path: plot.redraw(run_dir, console))
    for where in trackers.describe():
        console.print(f"tracking: {where}", soft_wrap=True, highlight=False)
    try:
        after = trainer.train(resume_from=latest if resume else None)
    finally:
        trackers.finish()
    seconds = trainer.train_seconds
    console.print(f"after training:  {_summary_line(after)}")
    _samples(session, console, "samples after training")
    steps_run = trainer.step - start_step
    summary = {"method": recipe.method.name, "recipe": recipe_to_dict(recipe), "before": before, "after": after, "steps": trainer.step,
               "train_seconds": seconds,
               "seconds_per_step": seconds / steps_run if steps_run else None,
               "trainable_parameters": sum(p.numel() for p in session.model.parameters() if p.requires_grad)}
    ckpt.write_atomic_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    plot.redraw(run_dir, console)
    console.print(f"curves: {run_dir / plot.PNG}", highlight=False, soft_wrap=True)
    return after
