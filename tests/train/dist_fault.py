"""A ``lorakit`` command line whose rank 1 fails at its second optimizer step, run under torchrun by
tests/train/test_distributed.py. ``LORAKIT_TEST_FAULT=raise``: it raises (every rank must end, with one
line naming the rank); ``signal``: it gets SIGTERM (every rank must stop after the same step, with one
checkpoint)."""

import os
import signal

from lorakit.cli import main
from lorakit.train.loop import Trainer

real_step = Trainer.optimizer_step


def failing_step(self, batches, optimizer, scheduler):
    if self.world.rank == 1 and self.step == 1:
        if os.environ["LORAKIT_TEST_FAULT"] == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise RuntimeError("failure injected at step 2")
    return real_step(self, batches, optimizer, scheduler)


if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE") == "2"
    Trainer.optimizer_step = failing_step
    main()
