"""A ``lorakit`` command line whose rank 1 raises at its second optimizer step (run under torchrun by
tests/train/test_distributed.py: the failure must end every rank, with one line naming the rank)."""

import os

from lorakit.cli import main
from lorakit.train.loop import Trainer

real_step = Trainer.optimizer_step


def failing_step(self, batches, optimizer, scheduler):
    if self.world.rank == 1 and self.step == 1:
        raise RuntimeError("failure injected at step 2")
    return real_step(self, batches, optimizer, scheduler)


if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE") == "2"
    Trainer.optimizer_step = failing_step
    main()
