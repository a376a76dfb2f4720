"""``lorakit train RECIPE --nproc-per-node N``: start ``torchrun`` on this machine (torch's own launcher,
``torch.distributed.run``), which runs ``python -m lorakit train RECIPE`` in N processes.

torchrun watches its workers: when one fails, it stops the others and reports the failure; here that
report becomes one line naming the rank, after the rank's own error line.
"""

from __future__ import annotations

from rich.console import Console


def torchrun_args(nproc: int, train_args: list[str], verbose: bool = False) -> list[str]:
    """torchrun's arguments for a one-node run (``--standalone``: a free local port, no rendezvous setup)."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit", *["--verbose"] * verbose, "train", *train_args]


def launch_local(nproc: int, train_args: list[str], console: Console, verbose: bool = False) -> int:
    """Run ``lorakit [--verbose] train *train_args`` in ``nproc`` processes; returns the exit status (0,
    or the failed rank's exit code)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args(nproc, train_args, verbose)))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        console.print(f"[bold red]error:[/] rank {rank} of {nproc} failed (exit code {failure.exitcode}); "
                      "torchrun stopped the other ranks", highlight=False, soft_wrap=True)
        return failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
    return 0
