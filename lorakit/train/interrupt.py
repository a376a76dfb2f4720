"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM.

While :class:`StopSignals` is active, a SIGINT/SIGTERM arriving inside :meth:`StopSignals.holding`
(an optimizer step, a checkpoint write) does not interrupt it: it is recorded, and the trainer calls
:meth:`StopSignals.check` between steps, where weights, optimizer and RNG state agree, so the
checkpoint written there resumes exactly. Elsewhere (loading, evaluating) the signal stops at once.
A second signal inside a held block stops at once too (``forced``: no checkpoint; the last one written
stays valid). :class:`Stopped` derives from BaseException, like KeyboardInterrupt, so no library's
``except Exception`` swallows it. Exit status by the shell convention: 128 + the signal number (130
for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A stop signal arrived. ``exit_code`` is 128 + the signal number; ``forced``: it interrupted a held
    block (no checkpoint may be written). The trainer sets ``step`` and ``checkpoint`` (the newest one)."""

    def __init__(self, signum: int, forced: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.forced = signum, forced
        self.exit_code = 128 + signum
        self.step: int | None = None
        self.checkpoint: Path | None = None


class StopSignals:
    """Context manager: SIGINT/SIGTERM become :class:`Stopped`, held back inside :meth:`holding`.

    Off the main thread (where handlers cannot be installed) it does nothing."""

    def __init__(self):
        self.requested: int | None = None
        self.deferring = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.deferring and self.requested is None:
            self.requested = signum
            return
        raise Stopped(signum, forced=self.deferring)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    @contextlib.contextmanager
    def holding(self):
        """A block a first signal does not interrupt: it is recorded, to be raised by :meth:`check`."""
        outer, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = outer

    def hold_always(self) -> None:
        """Hold every signal from now on (:meth:`holding` everywhere); :meth:`check` still raises. For a
        distributed run, where the ranks must stop at the same step (``Trainer._agree_on_stop``)."""
        self.deferring = True

    def check(self) -> None:
        """Raise :class:`Stopped` if a signal was recorded."""
        if self.requested is not None:
            signum, self.requested = self.requested, None
            raise Stopped(signum)
