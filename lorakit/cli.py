"""The ``lorakit`` command line: train, eval, merge, compare, export, generate, chat, list-methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from lorakit.errors import ArgumentError, LorakitError
from lorakit.output import LogConsole, quiet_third_party, tidy_help

app = typer.Typer(help="Fine-tune language models with the LoRA family, from YAML recipes.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = LogConsole(stderr=True)
out = LogConsole()
tidy_help()
state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        from lorakit import __version__

        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show other libraries' warnings, log lines "
                                 "and progress bars (quiet by default)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Fine-tune language models with the LoRA family, from YAML recipes."""
    state["verbose"] = verbose
    quiet_third_party(verbose)
TRUST = typer.Option(False, "--trust-remote-code", help="Allow the model folder's own Python code (config.json "
                     "auto_map) to run. A run folder's recipe can never turn this on by itself.")


def _fail(err: LorakitError) -> None:
    from lorakit.errors import Interrupted

    prefix = "" if isinstance(err, Interrupted) else "[bold red]error:[/] "
    console.print(f"{prefix}{escape(str(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. train.max_steps=20."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in output_dir (only a "
                                   "lorakit run folder; removed once the new run has started)."),
    trust_remote_code: bool = TRUST,
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, help="Start this many "
                                                 "processes on this machine (torchrun; one per GPU)."),
) -> None:
    """Fine-tune the recipe's model with its adapter method; writes checkpoints and metrics.jsonl.

    Under torchrun (torchrun --nproc_per_node N -m lorakit train RECIPE) each process trains its share."""
    if overwrite and resume:
        from lorakit.errors import RecipeError

        _fail(RecipeError("--overwrite and --resume: give one of them (--resume continues the run in output_dir, "
                          "--overwrite replaces it)"))
    if nproc_per_node is not None:
        from lorakit.config import load_recipe
        from lorakit.launch import launch_local

        try:
            load_recipe(recipe, overrides or [])  # a bad recipe: one line here, not one per process
        except LorakitError as err:
            _fail(err)
        flags = ["--resume"] * resume + ["--overwrite"] * overwrite + ["--trust-remote-code"] * trust_remote_code
        raise typer.Exit(launch_local(nproc_per_node, [str(recipe), *(overrides or []), *flags], console,
                                        verbose=state["verbose"]))
    extra = ["model.trust_remote_code=true"] if trust_remote_code else []
    try:
        from lorakit.config import load_recipe

        load_recipe(recipe, [*(overrides or []), *extra])  # a bad recipe fails before transformers / datasets load
    except LorakitError as err:
        _fail(err)
    from lorakit import world as world_

    world = world_.start()
    try:
        from lorakit.train.run import run_training

        run_training(recipe, [*(overrides or []), *extra], resume, console, world=world, verbose=state["verbose"],
                     overwrite=overwrite)
    except LorakitError as err:
        _fail(type(err)(f"{world.label()}: {err}") if world.size > 1 else err)
    except Exception as err:
        if world.size == 1:
            raise
        import traceback

        traceback.print_exc()
        console.print(f"[bold red]error:[/] {world.label()} failed: {type(err).__name__}: {escape(str(err))}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    world_.close(world)  # not after a failure: a peer may still wait in a collective


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="Run folder or checkpoint folder."),
    data: Optional[str] = typer.Option(None, "--data", help="Another data source (same format): all of it is "
                                       "evaluated (see --held-out)."),
    held_out: bool = typer.Option(False, "--held-out", help="With --data: evaluate only the held-out split "
                                  "training would make of it (data.eval_fraction, seed), not all of it."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Evaluate at this rank (methods with a variable rank)."),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="Comma-separated ranks, or 'all'."),
    trust_remote_code: bool = TRUST,
) -> None:
    """Held-out metrics of a trained adapter (loss/perplexity, or accuracy/macro-F1)."""
    try:
        from lorakit.session import load_run
        from lorakit.train.loop import Trainer

        if held_out and not data:
            raise ArgumentError("--held-out goes with --data (without --data the run's own held-out split is used)")
        overrides = {"data": {"source": data, "sources": []}} if data else None  # --data replaces a mix too
        session, path = load_run(run, console, overrides, trust_remote_code,
                                 eval_whole_data=bool(data) and not held_out)
        trainer = Trainer(session.model, session.tokenizer, session.method, session.data,
                          session.recipe, session.device, console, allow_compile=False)
        options = {k: v for k, v in (("rank", rank), ("ranks", ranks)) if v is not None}
        metrics = {"eval_examples": len(session.data.eval), **trainer.evaluate(**options)}  # a fixed-rank method refuses rank options
        by_source = {} if ranks else {name: {"eval_examples": len(rows), **trainer.evaluate(rows, **options)}
                                      for name, rows in session.data.eval_by_source().items()}  # a mix's sources
    except LorakitError as err:
        _fail(err)
    what = f"all of {data}" if data and not held_out else "the held-out split of " + (data or "the run's data")
    console.print(f"evaluated {metrics['eval_examples']} examples: {what}", markup=False, highlight=False,
                  soft_wrap=True)
    if as_json:
        out.print_json(json.dumps({"checkpoint": str(path), **metrics, **({"sources": by_source} if by_source else {})}))
        return
    out.print(f"eval of {path}", highlight=False, markup=False, soft_wrap=True)  # a path never broken mid-word
    per_rank = {k.removeprefix("rank_"): v for k, v in metrics.items() if isinstance(v, dict)}  # --ranks
    if per_rank:
        out.print(_metrics_table("held-out metrics by rank", "rank", per_rank))
        return
    table = Table(title="held-out metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value))
    out.print(table)
    if by_source:
        out.print(_metrics_table("held-out metrics by source", "source", by_source))


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_table(title: str, first: str, rows: dict[str, dict]) -> Table:
    """One row per key of ``rows`` (a rank, a source), one column per metric."""
    names = list(next(iter(rows.values())))
    table = Table(title=title)
    table.add_column(first)
    for name in names:
        table.add_column(name, justify="right")
    for key, values in rows.items():
        table.add_row(key, *(_fmt(values.get(n)) for n in names))
    return table


@app.command()
def merge(
    run: Path = typer.Argument(..., help="Run folder or checkpoint folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged transformers model."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights dtype: auto (the dtype the run trained its base in: "
                              "bfloat16 for train.precision bf16), float32, bfloat16, float16."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Merge at this rank (methods with a variable rank)."),
    onto: str = typer.Option("dequant", "--onto", help="Quantized base: merge onto dequant (the trained "
                             "4/8-bit weights, exact) or original (the 16/32-bit weights; deviates)."),
    trust_remote_code: bool = TRUST,
) -> None:
    """Merge the adapter into the base weights and save a standalone model folder (checked)."""
    try:
        from lorakit.merge import merge_run

        diff, saved, exact = merge_run(run, output, dtype, console, rank=rank, onto=onto,
                                       trust_remote_code=trust_remote_code)
    except LorakitError as err:
        _fail(err)
    rounded = "" if exact is None else f" ({exact:.3g} before the weights were rounded to {saved.split()[0]})"
    out.print(f"merged model written to {escape(str(output))} in {escape(saved)}; largest |logit difference| vs "
              f"the adapter model: {diff:.3g}{rounded}", soft_wrap=True)


@app.command()
def compare(
    recipes: list[Path] = typer.Argument(..., help="Recipes to train and compare, e.g. recipes/bbc-news-minilm*.yaml."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE override applied to every recipe (repeatable)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Train every recipe under each of these methods "
                                          "(comma-separated, or all), into OUTPUT_DIR-METHOD."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG of the runs' curves and final metric "
                                             "(default: compare.png beside the runs' folders)."),
) -> None:
    """Train several recipes (skipping finished runs), print one table side by side, draw them in one PNG."""
    try:
        from lorakit import compare as cmp
        from lorakit import plot as plots

        rows = cmp.compare(recipes, override or [], console, cmp.parse_methods(methods))
        dirs = [Path(r["output_dir"]) for r in rows]
        picture = plots.plot_runs(dirs, plot_path or cmp.default_plot_path(dirs), title="lorakit compare")
    except LorakitError as err:
        _fail(err)
    console.print(f"curves: {escape(str(picture))}", highlight=False, soft_wrap=True)
    if markdown:
        typer.echo(cmp.markdown(rows))  # plain text: no wrapping or markup
    else:
        out.print(cmp.table(rows))


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (output_dir of lorakit train)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default: RUN/curves.png "
                                          "for one run, runs.png here for several)."),
) -> None:
    """Draw loss, learning rate and held-out metrics of a run, or overlay several runs, as a PNG."""
    try:
        from lorakit import plot as plots

        if len(runs) == 1:  # one run: its own layout (loss, lr, metrics); -o only says where
            path = plots.plot_run(runs[0], output)
        else:
            path = plots.plot_runs(runs, output or Path("runs.png"))
    except LorakitError as err:
        _fail(err)
    out.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder or checkpoint folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the adapter."),
    fmt: str = typer.Option("peft", "--format", help="Adapter format: peft (a folder that peft, transformers and vLLM load)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Export at this rank (methods with a variable rank)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="base_model_name_or_path to record "
                                             "(default: the recipe's base; built-ins: lorakit's cached copy)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Reload the export with lorakit, and with "
                               "PEFT when installed, and compare logits with the run's model."),
    trust_remote_code: bool = TRUST,
) -> None:
    """Write the adapter in PEFT's format, loadable by peft, transformers and vLLM; check it by reloading
    it with lorakit, and with PEFT when peft is installed (the peft extra of lorakit)."""
    try:
        if fmt != "peft":
            raise ArgumentError(f"--format {fmt!r}: expected peft")
        from lorakit.export import export_run

        report = export_run(run, output, console, rank=rank, base_model=base_model, check=check,
                            trust_remote_code=trust_remote_code)
    except LorakitError as err:
        _fail(err)
    for line in report.lines():
        out.print(line, markup=False, highlight=False, soft_wrap=True)


MAX_NEW = typer.Option(256, "--max-new-tokens", help="Most tokens to generate per reply.")
TEMPERATURE = typer.Option(0.7, "--temperature", help="Sampling temperature.")
TOP_P = typer.Option(0.9, "--top-p", help="Nucleus sampling: keep the smallest token set with this much probability.")
GREEDY = typer.Option(False, "--greedy", help="Greedy decoding (no sampling).")
SEED = typer.Option(None, "--seed", help="Seed for sampling.")
TARGET = typer.Argument(..., help="Run or checkpoint folder, PEFT adapter folder, or model (folder, built-in name, hub id).")


def _load_for_generation(target: str, trust_remote_code: bool):
    """(model, tokenizer, device) for generate/chat; says on stderr what was loaded."""
    from lorakit.generate import load_for_generation

    model, tokenizer, device, what = load_for_generation(target, trust_remote_code, console)
    console.print(f"[dim]{escape(what)}[/dim]", soft_wrap=True)
    return model, tokenizer, device


@app.command()
def generate(
    target: str = TARGET,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (one user turn of the chat template)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as plain text, without the chat template."),
    max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_p: float = TOP_P,
    greedy: bool = GREEDY, seed: Optional[int] = SEED, trust_remote_code: bool = TRUST,
) -> None:
    """Generate one reply to a prompt, streamed; stops at the end-of-turn token."""
    try:
        from lorakit.generate import GenerationOptions, generate_reply

        model, tokenizer, device = _load_for_generation(target, trust_remote_code)
        options = GenerationOptions(max_new_tokens, temperature, top_p, greedy, seed)
        generate_reply(model, tokenizer, device, prompt, options, raw=raw)
    except LorakitError as err:
        _fail(err)


@app.command()
def chat(
    target: str = TARGET,
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
    max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_p: float = TOP_P,
    greedy: bool = GREEDY, seed: Optional[int] = SEED, trust_remote_code: bool = TRUST,
) -> None:
    """Chat through the tokenizer's chat template, replies streamed; /exit quits, /reset clears."""
    try:
        from lorakit.generate import GenerationOptions, chat_loop

        model, tokenizer, device = _load_for_generation(target, trust_remote_code)
        options = GenerationOptions(max_new_tokens, temperature, top_p, greedy, seed)
        chat_loop(model, tokenizer, device, options, console, system=system)
    except LorakitError as err:
        _fail(err)


@app.command("recipe")
def recipe_cmd(
    method: str = typer.Option("lora", "--method", "-m", help="Write the recipe for this method (its own fields included)."),
    as_markdown: bool = typer.Option(False, "--markdown", help="Print the reference of every field as Markdown tables instead."),
) -> None:
    """Print a complete default recipe, every field commented with its type, allowed values and meaning."""
    try:
        from lorakit import reference

        text = reference.markdown() if as_markdown else reference.commented_recipe(method)
    except LorakitError as err:
        _fail(err)
    typer.echo(text, nl=False)


@app.command("list-methods")
def list_methods(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """The registered adapter methods."""
    from lorakit.methods import REGISTRY

    rows = [
        {"name": cls.name, "paper": cls.paper, "trains": cls.trains,
         "hooks": cls.hooks_used(), "mergeable": cls.mergeable}
        for cls in REGISTRY.values()
    ]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="lorakit methods")
    table.add_column("name", no_wrap=True)
    table.add_column("paper", ratio=3)
    table.add_column("trains", ratio=4)
    table.add_column("hooks", no_wrap=True)  # one per line, never cut; paper and trains wrap instead
    table.add_column("merge", no_wrap=True)
    for row in rows:
        table.add_row(row["name"], row["paper"], row["trains"], "\n".join(row["hooks"]) or "-",
                      "yes" if row["mergeable"] else "no")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
