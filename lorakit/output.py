"""What lorakit prints, wherever it runs: third-party noise off unless ``--verbose``, a plain progress line
when the output is not a terminal (nohup, CI, SLURM logs), and the command-line help without typer's
type tags.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from datetime import timedelta

from rich.console import Console

# Read by transformers, huggingface_hub, datasets and tqdm when they are imported, so set before that.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # its LOAD REPORT and "Consider training" notes are warnings
    "HF_HUB_VERBOSITY": "error",  # huggingface_hub's own handler: "Retrying in 8s [Retry 5/5]." offline
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' loading / saving bars too
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # any other tqdm bar (GGUF conversion)
    "TOKENIZERS_PARALLELISM": "false",  # its fork warning
}


def quiet_third_party(verbose: bool) -> None:
    """Silence other libraries' warnings, log lines and progress bars (``verbose``: leave them on); the
    one place lorakit does so (also for the processes other than rank 0 of a distributed run).

    A variable the user set keeps the user's value. Log records of libraries without a handler of their
    own (bitsandbytes' kernel notes, which Python's last-resort handler would print) end at a
    ``NullHandler`` on the root logger."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", module=r"^(?!lorakit)")  # warnings raised outside lorakit
    root = logging.getLogger()
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
    if "transformers" in sys.modules:  # imported already (tests): the settings read at import are stale
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


class LogConsole(Console):
    """A rich console that, off a terminal (nohup, CI, a SLURM log), prints each plain string on one line
    however long (soft wrap), so a path in it can be copied and grepped; tables and other renderables
    still fit the width (80 columns unless ``COLUMNS`` says otherwise). On a terminal it is rich's."""

    def print(self, *objects, soft_wrap: bool | None = None, **kwargs) -> None:
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, str) for o in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


class PlainProgress:
    """The training progress as plain lines, for output that is not a terminal: a line every ``every``
    steps or ``seconds``, whichever comes first, and at the last step. The calls mirror
    :class:`rich.progress.Progress` as the trainer uses it (``add_task``, ``update``, a context)."""

    def __init__(self, console: Console, every: int, seconds: float = 60.0):
        self.console, self.every, self.seconds = console, max(1, every), seconds
        self.total = self.completed = self.shown = 0
        self.info, self.start, self.last = "", time.monotonic(), time.monotonic()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, info: str = "") -> int:
        self.total, self.completed = total, completed
        self.shown = completed
        self.first = completed
        return 0

    def update(self, task: int, completed: int | None = None, info: str | None = None) -> None:
        if info is not None:
            self.info = info
        if completed is None or completed == self.completed:
            return
        self.completed = completed
        now = time.monotonic()
        due = completed % self.every == 0 or now - self.last >= self.seconds or completed == self.total
        if due and completed != self.shown:
            self.shown, self.last = completed, now
            self.console.print(self.line(now), highlight=False, markup=False, soft_wrap=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = self.completed - self.first
        eta = elapsed / done * (self.total - self.completed) if done else 0.0
        clock = lambda s: str(timedelta(seconds=round(s)))  # noqa: E731
        percent = 100 * self.completed / max(self.total, 1)
        return (f"train step {self.completed}/{self.total} ({percent:.0f}%)  {self.info}  "
                f"elapsed {clock(elapsed)}  eta {clock(eta)}").replace("   ", "  ")


def progress_for(console: Console, total: int, columns: list):
    """A rich progress bar on a terminal, else :class:`PlainProgress` (a line every 5% of the steps or
    minute). ``columns``: the rich columns of the bar."""
    if console.is_terminal:
        from rich.progress import Progress

        return Progress(*columns, console=console, transient=False)
    return PlainProgress(console, every=max(1, total // 20))


def tidy_help() -> None:
    """typer's help without its type tags after flags (``--resume <bool>``) and braces around required
    arguments in the usage line (``{recipe}``): flags show no type, arguments their upper-case name."""
    from typer.core import TyperArgument, TyperOption

    option_type = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else option_type(self, ctx)

    def usage_name(self) -> str:
        name = self.display_name_raw.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperOption.display_type_rich = display_type_rich
    TyperArgument._usage_display_name = usage_name
