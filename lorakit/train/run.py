"""``lorakit train``: recipe → session → before/after metrics and samples → checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from lorakit.config import load_recipe
from lorakit.errors import LorakitError
from lorakit.evaluate import generate_samples
from lorakit.session import build_session, parameter_table
from lorakit.train import checkpoint as ckpt
from lorakit.train.loop import Trainer


def _summary_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _samples(session, console: Console, title: str) -> None:
    prompts = session.data.sample_prompts[: session.recipe.train.num_samples]
    if not prompts:
        return
    answers = generate_samples(session.model, session.tokenizer, prompts, session.device)
    console.print(f"[bold]{title}[/]")
    for prompt, answer in zip(prompts, answers):
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        console.print(f"  [cyan]Q:[/] {question}\n  [green]A:[/] {answer}", highlight=False)


def run_training(recipe_path: Path, overrides: list[str], resume: bool, console: Console) -> dict:
    """Validate the recipe, train, and write the run folder. Returns the final metrics.

    Raises:
        RecipeError: the recipe is invalid (before any model loads).
        LorakitError: the output folder already holds a run and ``resume`` is off, or ``resume`` is
            on and there is no checkpoint.
    """
    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(recipe.output_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    method_state = None
    if resume:
        if latest is None:
            raise LorakitError(f"--resume: output_dir {run_dir} has no checkpoint to resume from")
        _, method_state = ckpt.read_checkpoint_meta(latest)
    elif latest is not None or (run_dir / "final").exists():
        raise LorakitError(
            f"output_dir {run_dir} already holds a run; pass --resume to continue it, or choose another "
            f"output_dir (e.g. output_dir={run_dir}-2)"
        )
    session = build_session(recipe, console, method_state)
    if resume:
        ckpt.load_adapter_weights(session.model, latest / ckpt.ADAPTER_FILE)
    console.print(parameter_table(session.model, session.method))
    trainer = Trainer(session.model, session.tokenizer, session.method, session.data, recipe,
                      session.device, console)
    run_dir.mkdir(parents=True, exist_ok=True)
    before = None
    if not resume:
        before = trainer.evaluate()
        console.print(f"before training: {_summary_line(before)}")
        _samples(session, console, "samples before training")
    start_step, t0 = trainer.step if not resume else None, time.perf_counter()
    after = trainer.train(resume_from=latest if resume else None)
    seconds = time.perf_counter() - t0
    console.print(f"after training:  {_summary_line(after)}")
    _samples(session, console, "samples after training")
    steps_run = trainer.step - (start_step or 0) if start_step is not None else None
    summary = {"method": recipe.method.name, "before": before, "after": after, "steps": trainer.step,
               "train_seconds": seconds,
               "seconds_per_step": seconds / steps_run if steps_run else None,
               "trainable_parameters": sum(p.numel() for p in session.model.parameters() if p.requires_grad)}
    ckpt.write_atomic_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return after
