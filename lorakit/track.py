"""Experiment tracking through the trackers' own libraries: ``train.report_to: [tensorboard, trackio,
wandb, mlflow]`` (none by default; each is an optional extra, ``pip install 'lorakit[tensorboard]'``).

Every tracker receives exactly the records written to ``metrics.jsonl`` (training records as
``train/<key>``, evaluation records as ``eval/<key>``, at the record's ``step``) and the resolved recipe
as the run's configuration. Where each writes:

- ``tensorboard``: event files in ``<output_dir>/tensorboard`` (``tensorboard --logdir <output_dir>``);
- ``trackio``: trackio's local store (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
  project ``train.project``, run ``train.run_name`` (``trackio show --project lorakit``);
- ``wandb``: the W&B run in project ``train.project`` (``WANDB_MODE=offline`` keeps it in
  ``<output_dir>/wandb``);
- ``mlflow``: experiment ``train.project`` at ``$MLFLOW_TRACKING_URI`` (mlflow's default otherwise);
  the recipe as flattened parameters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import yaml

from lorakit.config import flat_fields
from lorakit.errors import LorakitError

# tracker name → (the module it needs, the lorakit extra that installs it)
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(report_to: list[str]) -> None:
    """Raise LorakitError (one line naming every missing tracker and the extras that install them) when a
    tracker's library is missing; cheap, so it runs before any model loads."""
    missing = [name for name in report_to if importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise LorakitError(f"train.report_to: {' and '.join(missing)} {verb} not installed; pip install "
                           f"'lorakit[{','.join(missing)}]' (or pip install {' '.join(TRACKERS[n] for n in missing)})")


def tag_values(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics.jsonl record: numbers only, training keys under ``train/``,
    evaluation keys (a record without ``loss``) under ``eval/``."""
    prefix = "train" if "loss" in record else "eval"
    values = {f"{prefix}/{key}": float(value) for key, value in record.items()
              if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return int(record["step"]), values


@contextlib.contextmanager
def quiet(verbose: bool):
    """Hide a library's own banners (printed to stdout) unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class TensorBoard:
    def __init__(self, run_dir: Path, recipe: dict, names: dict, start_step: int, verbose: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.where = run_dir / "tensorboard"
        # purge_step: a resumed run hides the events written after the checkpoint it continues from
        self.writer = SummaryWriter(log_dir=str(self.where), purge_step=start_step or None)
        if not start_step:
            self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def finish(self) -> None:
        self.writer.close()


class Trackio:
    def __init__(self, run_dir: Path, recipe: dict, names: dict, start_step: int, verbose: bool):
        import trackio

        self.verbose = verbose
        with quiet(verbose):
            self.run = trackio.init(project=names["project"], name=names["run"], config=recipe,
                                    resume="allow" if start_step else "never",
                                    auto_log_gpu=False, auto_log_cpu=False)
        self.where = f"trackio project {names['project']}, run {names['run']} (trackio show --project {names['project']})"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        import trackio

        with quiet(self.verbose):
            trackio.finish()  # (not run.finish: trackio's exit handler would finish the run again, loudly)


class Wandb:
    def __init__(self, run_dir: Path, recipe: dict, names: dict, start_step: int, verbose: bool):
        import wandb

        self.run = wandb.init(project=names["project"], name=names["run"], config=recipe, dir=str(run_dir),
                              resume="allow" if start_step else None)
        self.where = f"wandb project {names['project']}, run {names['run']}"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, recipe: dict, names: dict, start_step: int, verbose: bool):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(names["project"])
        self.run = mlflow.start_run(run_name=names["run"])
        mlflow.log_params({k: str(v)[:500] for k, v in flat_fields(recipe).items()})
        self.where = f"mlflow experiment {names['project']}, run {names['run']} ({mlflow.get_tracking_uri()})"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


CLASSES = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb, "mlflow": MLflow}


class Trackers:
    """The recipe's trackers, fed the metrics.jsonl records (:meth:`log`) until :meth:`finish`."""

    def __init__(self, report_to: list[str], run_dir: Path, recipe: dict, start_step: int = 0,
                 verbose: bool = False):
        train = recipe.get("train", {})
        names = {"project": train.get("project") or "lorakit",
                 "run": train.get("run_name") or Path(run_dir).resolve().name}
        self.active = [CLASSES[name](Path(run_dir), recipe, names, start_step, verbose) for name in report_to]

    def describe(self) -> list[str]:
        return [str(tracker.where) for tracker in self.active]

    def log(self, record: dict) -> None:
        step, values = tag_values(record)
        for tracker in self.active:
            tracker.log(step, values)

    def finish(self) -> None:
        for tracker in self.active:
            tracker.finish()
        self.active = []
