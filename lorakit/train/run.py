"""``lorakit train``: recipe → session → before/after metrics and samples → checkpoints."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lorakit import plot, track, trust
from lorakit.config import flat_fields, load_recipe, recipe_to_dict
from lorakit.errors import Interrupted, LorakitError
from lorakit.evaluate import generate_samples
from lorakit.output import quiet_third_party
from lorakit.precision import recipe_precision
from lorakit.session import Checkpoint, load_session, parameter_table, recipe_weights
from lorakit.storage import checkpoint as ckpt, retention, trainer_state as tstate
from lorakit.storage.runlock import RunLock, check_free
from lorakit.train.interrupt import StopSignals, Stopped
from lorakit.train import distributed, keep
from lorakit.train.loop import Trainer
from lorakit.world import World


def _summary_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _samples(session, console: Console, title: str, world: World) -> None:
    """Greedy answers to the sample prompts, printed by rank 0 (under FSDP every rank generates: each
    forward gathers the layers from all ranks)."""
    prompts = session.data.sample_prompts[: session.recipe.train.num_samples]
    if not prompts or not (world.is_main or world.mode == "fsdp"):
        return
    answers = generate_samples(session.model, session.tokenizer, prompts, session.device,
                               precision=recipe_precision(session.recipe, session.device))
    console.print(f"[bold]{title}[/]")
    for prompt, answer in zip(prompts, answers):
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        console.print(f"  [cyan]Q:[/] {escape(str(question))}\n  [green]A:[/] {escape(answer)}", highlight=False)


# Fields a resumed run may change: they do not alter the batches, the optimizer or the schedule seen so far.
RESUMABLE_CHANGES = {"train.max_steps", "train.num_epochs", "train.eval_every", "train.save_every",
                     "train.log_every", "train.num_samples", "train.eval_batch_size", "train.distributed",
                     "train.cross_entropy", "train.kernels", "train.compile",  # these three: speed only
                     "train.report_to", "train.project", "train.run_name",  # tracking only
                     "train.save_total_limit", "train.load_best_at_end",  # run management (lorakit.train.keep)
                     "train.early_stopping_patience", "train.early_stopping_threshold"}
# Fields added after checkpoints were first written, and what an old checkpoint ran with
# (None: whatever the resumed recipe says; the checkpoint stored no state for it)
ADDED_FIELDS = {"train.precision": "auto", "train.metric_for_best": None, "train.greater_is_better": None}


def check_resumable(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse a resume whose recipe differs from the checkpoint's beyond ``RESUMABLE_CHANGES``
    (``output_dir`` may differ: a run folder may be moved or copied and resumed where it is now).

    Raises LorakitError naming the first differing field and both values.
    """
    old, new = flat_fields(saved), flat_fields(current)
    for key, value in ADDED_FIELDS.items():  # saved before the field existed (precision auto: bf16 on CUDA, fp32 on CPU)
        old.setdefault(key, new.get(key) if value is None else value)
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES | {"output_dir"} and old.get(key) != new.get(key):
            hint = f" (pass {trust.TRUST_FLAG} if you trust that code)" if key == "model.trust_remote_code" else ""
            raise LorakitError(
                f"--resume: {key} is {new.get(key)!r} here but {old.get(key)!r} in {checkpoint}/recipe.yaml{hint}; "
                f"a resumed run may change only {', '.join(sorted(RESUMABLE_CHANGES))}"
            )


def check_world_size(saved: dict, current: dict, saved_world: int, world: World, checkpoint: Path) -> None:
    """A run may resume on another number of processes if the global micro-batch (``train.batch_size`` ×
    processes) stays the same: then it sees the same batches and continues with the same losses.
    Updates ``saved`` so that :func:`check_resumable` accepts the new per-device batch size.

    Raises LorakitError naming both products and the batch size that would keep them equal."""
    old_b, new_b = saved.get("train", {}).get("batch_size"), current["train"]["batch_size"]
    if not isinstance(old_b, int) or old_b * saved_world == new_b * world.size:
        if isinstance(old_b, int):
            saved.setdefault("train", {})["batch_size"] = new_b
        return
    fits = old_b * saved_world % world.size == 0
    hint = (f"pass train.batch_size={old_b * saved_world // world.size}" if fits
            else "use a number of processes that divides it")
    raise LorakitError(f"--resume: {checkpoint} was trained with train.batch_size {old_b} on {saved_world} "
                       f"process(es) = {old_b * saved_world} rows per micro-batch; here {new_b} × {world.size} = "
                       f"{new_b * world.size}; {hint} to continue with the same batches")


def batch_line(recipe, world: World) -> str:
    """The batch sizes of a run, e.g. ``batch: 4 per device × 2 accumulation × 2 processes, DDP = 16 rows per step``."""
    cfg = recipe.train
    total = cfg.batch_size * cfg.gradient_accumulation_steps * world.size
    mode = {"ddp": ", DDP", "fsdp": ", FSDP"}.get(world.mode, "")
    return (f"batch: {cfg.batch_size} per device × {cfg.gradient_accumulation_steps} accumulation × "
            f"{world.size} process{'es' if world.size > 1 else ''}{mode} = {total} rows per step")


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (by a run that stopped after its last checkpoint), and a line
    cut short by a crash."""
    if path.is_file():
        lines = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                lines.append(line)
        ckpt.write_atomic_text(path, "".join(line + "\n" for line in lines))


def starting_point(run_dir: Path, recipe, resume: bool, console: Console,
                   world: World | None = None) -> tuple[Path | None, int]:
    """(checkpoint to resume from or None, its step), after cleaning what interrupted
    writes left. A folder with no checkpoint yet starts again from step 0 (with or without ``resume``).
    On several processes rank 0 alone cleans and trims; the resumed checkpoint may come from another
    number of processes (:func:`check_world_size`).

    Raises LorakitError: the folder holds a run with checkpoints and ``resume`` is off; ``resume`` on a
    folder whose only checkpoint is ``final/``; a checkpoint whose recipe differs (:func:`check_resumable`).
    """
    world = world or World()
    for line in ckpt.clean_stale(run_dir) if world.is_main else []:
        console.print(f"interrupted write cleaned up: {line}", markup=False, highlight=False, soft_wrap=True)
    latest = ckpt.latest_checkpoint(run_dir)
    finished = (run_dir / "final" / ckpt.ADAPTER_FILE).is_file()
    if latest is None and not finished:
        if any((run_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "summary.json")):
            console.print(f"{run_dir} holds a run stopped before its first checkpoint: starting again from step 0",
                          markup=False, highlight=False, soft_wrap=True)
            if world.is_main:
                keep_metrics_until(run_dir / "metrics.jsonl", -1)  # its step-0 evaluation is made again
        elif resume:
            console.print(f"--resume: {run_dir} has no checkpoint yet: starting from step 0", markup=False,
                          highlight=False, soft_wrap=True)
        return None, 0
    if not resume:
        raise LorakitError(
            f"output_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or choose another output_dir (e.g. output_dir={run_dir}-2)"
        )
    if latest is None:
        raise LorakitError(f"--resume: {run_dir} holds a finished run (final/) but no training checkpoint to "
                           "continue from; choose another output_dir to train again")
    saved_recipe, _ = ckpt.read_checkpoint_meta(latest)
    check_world_size(saved_recipe, recipe_to_dict(recipe), tstate.read_world_size(latest), world, latest)
    check_resumable(saved_recipe, recipe_to_dict(recipe), latest)
    step = tstate.check(latest)  # a damaged file: named now, before the model loads
    keep.BestTracker.from_recipe(recipe.train).load_state_dict(tstate.read_best(latest),
                                                               str(latest / "trainer.json"))
    saved_dir = saved_recipe.get("output_dir")
    if saved_dir is not None and Path(str(saved_dir)).resolve() != run_dir.resolve():
        console.print(f"note: this run was started in {saved_dir} and continues in {run_dir} (moved or copied)",
                      markup=False, highlight=False, soft_wrap=True)
    if world.is_main:
        keep_metrics_until(run_dir / "metrics.jsonl", step)
    return latest, step


def stop_message(stop: Stopped, recipe_path: Path, overrides: list[str]) -> str:
    """One line: where training stopped, the checkpoint, and the command that resumes it."""
    command = shlex.join(["lorakit", "train", str(recipe_path), *overrides, "--resume"])
    name = signal.Signals(stop.signum).name
    if stop.checkpoint is None:
        return f"stopped ({name}) at step {stop.step or 0}, before any checkpoint; start again with: {command}"
    return f"stopped ({name}) at step {stop.step}; checkpoint {stop.checkpoint}; resume with: {command}"


def run_training(recipe_path: Path, overrides: list[str], resume: bool, console: Console,
                 verbose: bool = False, world: World | None = None, overwrite: bool = False) -> dict:
    """Validate the recipe, train, and write the run folder. Returns the final metrics.

    ``world``: this process's place in a distributed run (:func:`lorakit.world.start`); default one
    process. Every rank calls this; rank 0 alone prints and writes the run folder.

    SIGINT / SIGTERM stop the run between two steps with a checkpoint (:mod:`lorakit.train.interrupt`).

    ``overwrite``: a run already in ``output_dir`` is replaced (checked to be a run folder before the model
    loads; moved aside just before the new run writes, and removed once it has written its first file).

    Rank 0 holds ``output_dir``'s lock (:mod:`lorakit.storage.runlock`) from just before it first writes
    there until this returns or raises; a folder whose lock another process holds is refused before the
    model loads (or, in a race, before anything is written).

    Raises:
        RecipeError: the recipe is invalid (before any model loads).
        LorakitError: see :func:`starting_point`; with ``overwrite``, ``output_dir`` is not a run folder
            (:func:`lorakit.storage.retention.check_overwritable`); ``output_dir`` is in use by another
            process; its ``checkpoints/`` or ``final/`` is a link.
        Interrupted: a stop signal arrived; the message names the checkpoint and the resume command.
    """
    world = world or World()
    if not world.is_main:  # rank 0 alone reports
        console = Console(quiet=True)
        quiet_third_party(verbose=False)  # rank 0 alone shows them (under --verbose)
    recipe = load_recipe(recipe_path, overrides)
    ckpt.check_output_folder(Path(recipe.output_dir), "output_dir")
    retention.check_links(Path(recipe.output_dir))
    for note in recipe.method.set_aside_notes():  # a generic field this method cannot honour
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    with StopSignals() as stop, RunLock() as lock:
        try:
            return _train(recipe, resume, console, verbose, stop, world, lock, overwrite)
        except Stopped as err:
            raise Interrupted(stop_message(err, recipe_path, overrides), err.exit_code) from None


def _train(recipe, resume: bool, console: Console, verbose: bool, stop: StopSignals, world: World,
           lock: RunLock, overwrite: bool = False) -> dict:
    run_dir = Path(recipe.output_dir)
    if world.is_main:  # a live run's folder is neither replaced, resumed nor trained in again
        check_free(run_dir)
    if overwrite:  # the old run stays in place until the new one is about to write
        if run_dir.is_dir() and any(run_dir.iterdir()):
            retention.check_overwritable(run_dir)
        latest, start_step = None, 0
    else:
        with world.main_first():  # rank 0 cleans the run folder before the others read it
            latest, start_step = starting_point(run_dir, recipe, resume, console, world)
    track.check_installed(recipe.train.report_to)  # a missing tracker fails before the model loads
    with world.main_first():  # rank 0 fills the shared caches (built-in models and data) first
        session = load_session(recipe, Checkpoint(latest) if latest is not None else recipe_weights(recipe), console,
                               describe_data=True)
    world, note = distributed.resolve_mode(world, recipe.train.distributed, session.method)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    console.print(parameter_table(session.model, session.method))
    console.print(batch_line(recipe, world))
    trainer = Trainer(session.model, session.tokenizer, session.method, session.data, recipe,
                      session.device, console, world=world)
    with world.main_first():
        if world.is_main:  # held until this run ends; taken again on the new folder once the old is aside
            lock.take(run_dir)
        aside = retention.move_aside(run_dir) if overwrite and world.is_main else None
        if aside is not None:
            lock.take(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    if aside is not None:
        console.print(f"--overwrite: the old run in {run_dir} was moved to {aside}; it is removed once this run "
                      "has started", markup=False, highlight=False, soft_wrap=True)
    before = None
    if latest is not None and (run_dir / "summary.json").is_file():
        before = trust.read_json(run_dir / "summary.json", "summary.json")
        before = before.get("before") if isinstance(before, dict) else None
    if latest is None:
        try:
            before = trainer.evaluate()
        except BaseException:  # stopped before its first file: the old run goes back in place
            if aside is not None and retention.put_back(aside, run_dir):
                console.print(f"--overwrite: this run stopped before writing anything; the old run is back in "
                              f"{run_dir}", markup=False, highlight=False, soft_wrap=True)
            raise
        if world.is_main:
            ckpt.write_atomic_text(run_dir / "summary.json", json.dumps({"before": before}, indent=1))
        console.print(f"before training: {_summary_line(before)}")
        _samples(session, console, "samples before training", world)
    if aside is not None:  # the new run has written its first file
        shutil.rmtree(aside)
    for left in retention.clean_overwritten(run_dir) if overwrite and world.is_main else []:
        console.print(f"--overwrite: removed {left}, left by an earlier --overwrite that was killed", markup=False,
                      highlight=False, soft_wrap=True)
    report_to = recipe.train.report_to if world.is_main else []  # rank 0 alone reports
    trackers = track.Trackers(report_to, run_dir, recipe_to_dict(recipe), start_step, verbose)
    trainer.on_record.append(trackers.log)
    if latest is None:  # the before-training evaluation, in metrics.jsonl and the trackers like the others
        trainer.log({"step": 0, **before})
    trainer.on_checkpoint.append(lambda _path: plot.redraw(run_dir, console))
    for where in trackers.describe():
        console.print(f"tracking: {escape(where)}", soft_wrap=True, highlight=False)
    try:
        after = trainer.train(resume_from=latest, stop=stop)
    except Stopped as err:
        if err.checkpoint is None and latest is not None:
            err.checkpoint = latest
        raise
    finally:
        trackers.finish()
    seconds = trainer.train_seconds
    console.print(f"after training:  {_summary_line(after)}")
    by_source = {name: trainer.evaluate(rows) for name, rows in session.data.eval_by_source().items()}  # a mix
    for name, metrics in by_source.items():
        console.print(f"  {name}: {_summary_line(metrics)}", markup=False, highlight=False, soft_wrap=True)
    _samples(session, console, "samples after training", world)
    steps_run = trainer.step - start_step
    summary = {"method": recipe.method.name, "recipe": recipe_to_dict(recipe), "before": before, "after": after, "steps": trainer.step,
               "train_seconds": seconds,
               "seconds_per_step": seconds / steps_run if steps_run else None,
               "trainable_parameters": sum(p.numel() for p in session.model.parameters() if p.requires_grad),
               "world_size": world.size, **keep.summary_record(trainer), **({"after_by_source": by_source} if by_source else {})}
    if world.is_main:
        ckpt.write_atomic_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        plot.redraw(run_dir, console)
        console.print(f"curves: {escape(str(run_dir / plot.PNG))}", highlight=False, soft_wrap=True)
    return after
