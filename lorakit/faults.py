"""Fault injection for the tests: stop this process at a named point of a training run.

``$LORAKIT_KILL_AT`` names one point (e.g. ``step:3``, ``save:step-000002:written``) and optionally a
signal: ``step:3`` sends SIGKILL (a crash: nothing runs after it), ``step:3=INT`` / ``step:3=TERM`` send
SIGINT / SIGTERM (a Ctrl-C / a ``kill``, handled by :mod:`lorakit.train.interrupt`). Unset, the points
do nothing. The points: ``step:N`` after optimizer step N; for each checkpoint folder NAME
(``step-000002``, ``final``): ``save:NAME:written`` (files written, not yet in place),
``save:NAME:swapped`` (an earlier NAME moved aside, the new one not yet in place) and
``save:NAME:renamed`` (in place, ``latest`` not yet updated); ``delete:NAME:renamed`` (a checkpoint
beyond ``train.save_total_limit`` renamed for deletion, not yet deleted).
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "LORAKIT_KILL_AT"
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}


def kill_point(name: str) -> None:
    """Send this process the signal ``$LORAKIT_KILL_AT`` asks for when it names ``name``; else nothing."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, sig = spec.partition("=")
    if point == name:
        os.kill(os.getpid(), SIGNALS[sig or "KILL"])
