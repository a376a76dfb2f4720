"""``lorakit compare``: train several recipes (e.g. one task under several methods) and tabulate them.

Each recipe trains into its own ``output_dir`` as ``lorakit train`` would. With ``methods`` every recipe
trains once per method, only ``method.name`` changed, into ``OUTPUT_DIR-METHOD`` (a field the method
cannot honour is set aside with a warning, as in ``lorakit train``). A run that already finished
(its ``summary.json`` exists) is not trained again, so an interrupted comparison picks up where it
stopped. The table gives, per run: method, trainable parameters, seconds per optimizer step, and the
final held-out metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorakit import trust
from lorakit.config import load_recipe, recipe_to_dict
from lorakit.errors import LorakitError, RecipeError
from lorakit.methods import REGISTRY, get_method_class
from lorakit.storage import checkpoint as ckpt
from lorakit.train.run import run_training

METRICS = ("accuracy", "macro_f1", "eval_loss", "perplexity")


def read_summary(path: Path) -> dict:
    """A run folder's ``summary.json``. Raises LorakitError naming it when it is not a JSON object."""
    summary = trust.read_json(path, "summary.json")
    if not isinstance(summary, dict):
        raise LorakitError(f"{path}: not a valid summary.json (not a JSON object)")
    return summary


def parse_methods(text: str | None) -> list[str] | None:
    """``--methods``: ``all`` or comma-separated method names (``lora,dora``); None when not given.

    Raises RecipeError naming an unknown method (with the nearest name) or an empty/repeated entry.
    """
    if text is None:
        return None
    if text.strip() == "all":
        return list(REGISTRY)
    names = [n.strip() for n in text.split(",")]
    for name in names:
        try:
            get_method_class(name)
        except RecipeError as err:  # "method.name = 'x' is not a method (did you mean ...); allowed: ..."
            raise RecipeError(f"--methods: {str(err).removeprefix('method.name = ')}") from None
        if names.count(name) > 1:
            raise RecipeError(f"--methods: {name} is named twice")
    return names


def jobs(recipes: list[Path], overrides: list[str], methods: list[str] | None) -> list[tuple[Path, list[str]]]:
    """(recipe, overrides) per run: one per recipe, or one per recipe and method (``OUTPUT_DIR-METHOD``)."""
    if not methods:
        return [(path, list(overrides)) for path in recipes]
    out = []
    for path in recipes:
        base = load_recipe(path, overrides).output_dir.rstrip("/\\")
        # a JSON string is a YAML scalar: the folder name stays a string whatever it looks like
        out += [(path, [*overrides, f"method.name={m}", f"output_dir={json.dumps(f'{base}-{m}')}"]) for m in methods]
    return out


def compare(recipes: list[Path], overrides: list[str], console: Console,
            methods: list[str] | None = None) -> list[dict]:
    """Train every run that has not finished yet; return one row per run (see :func:`jobs`).

    Raises RecipeError for an invalid recipe before anything trains (all are validated first), and
    LorakitError when two runs would share an ``output_dir``.
    """
    resolved = [(path, extra, load_recipe(path, extra)) for path, extra in jobs(recipes, overrides, methods)]
    dirs = [recipe.output_dir for _, _, recipe in resolved]
    for (path, _, recipe), out_dir in zip(resolved, dirs):
        if dirs.count(out_dir) > 1:
            raise LorakitError(f"{path}: output_dir {out_dir} is shared with another recipe; each needs its own")
    rows = []
    for path, overrides, recipe in resolved:
        summary_file = Path(recipe.output_dir) / "summary.json"
        summary = read_summary(summary_file) if summary_file.is_file() else {}
        if "after" in summary and summary.get("recipe") != recipe_to_dict(recipe):
            raise LorakitError(f"{path}: {recipe.output_dir} holds a finished run of another recipe; "
                               "remove it or choose another output_dir")
        if "after" not in summary:
            console.rule(f"{path} ({recipe.method.name})")
            run_training(path, overrides, resume=ckpt.latest_checkpoint(Path(recipe.output_dir)) is not None,
                         console=console)
            summary = read_summary(summary_file)
        rows.append({"recipe": str(path), "method": recipe.method.name, "output_dir": recipe.output_dir,
                     "trainable_parameters": summary["trainable_parameters"],
                     "seconds_per_step": summary.get("seconds_per_step"),
                     **{k: summary["after"][k] for k in METRICS if k in summary["after"]}})
    return rows


def default_plot_path(dirs: list[Path]) -> Path:
    """``compare.png`` in the deepest folder that holds every run folder."""
    parents = [Path(os.path.abspath(d)).parent for d in dirs]
    return Path(os.path.commonpath(parents)) / "compare.png"


def table(rows: list[dict]) -> Table:
    metrics = [k for k in METRICS if any(k in r for r in rows)]
    out = Table(title="lorakit compare")
    for col in ("method", "recipe", "trainable", "s/step", *metrics):
        out.add_column(col, justify="left" if col in ("method", "recipe") else "right")
    for r in rows:
        sps = r["seconds_per_step"]
        out.add_row(r["method"], Path(r["recipe"]).name, f"{r['trainable_parameters']:,}",
                    "-" if sps is None else f"{sps:.3f}", *(f"{r[k]:.4f}" if k in r else "-" for k in metrics))
    return out


def markdown(rows: list[dict]) -> str:
    metrics = [k for k in METRICS if any(k in r for r in rows)]
    head = ["method", "recipe", "trainable params", "s/step", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sps = r["seconds_per_step"]
        cells = [r["method"], f"`{r['recipe']}`", f"{r['trainable_parameters']:,}",
                 "-" if sps is None else f"{sps:.3f}", *(f"{r[k]:.4f}" if k in r else "-" for k in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
