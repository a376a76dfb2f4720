"""Run management on 2 processes (gloo, CPU): every rank stops early at the step rank 0 decides, even when
its own numbers would say otherwise; rank 0 alone removes folders; with load_best_at_end every rank (also
FSDP2 shards) ends with the best checkpoint's adapter."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lorakit.train.keep import BestTracker
from lorakit.world import World
from tests.train import dist_jobs
from tests.train.test_distributed import spawn_job

RANK0 = {1: 5.0, 2: 4.0, 3: 4.5, 4: 4.6}  # best at 2, two evaluations without improvement: stop at 4
RANK1 = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}  # would never stop; rank 0 decides


def job(rank: int, root: str, mode: str) -> None:
    root = Path(root)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-{mode}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    trainer = dist_jobs.make(root, "lora", World(rank=rank, size=2, mode=mode), name=mode)
    cfg = trainer.recipe.train
    cfg.eval_every, cfg.save_total_limit, cfg.load_best_at_end, cfg.early_stopping_patience = 1, 1, True, 2
    trainer.best = BestTracker.from_recipe(cfg)
    losses = RANK0 if rank == 0 else RANK1
    trainer.evaluate = lambda **options: {"eval_loss": losses.get(trainer.step, 9.0), "perplexity": 1.0,
                                          "eval_tokens": 1}
    trainer.train()
    dist_jobs.dump_adapter(trainer, root / mode / f"rank{rank}.safetensors")
    (root / mode / f"ending{rank}.json").write_text(json.dumps({"step": trainer.step, **trainer.ending}))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ranks_agree_on_early_stopping_and_load_the_best(tmp_path, mode):
    spawn_job(job, (str(tmp_path), mode))
    run = tmp_path / mode
    endings = [json.loads((run / f"ending{r}.json").read_text()) for r in (0, 1)]
    assert endings[0]["step"] == endings[1]["step"] == 4
    assert endings[0]["stopped_early"]["step"] == endings[1]["stopped_early"]["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]
    best = load_file(str(run / "checkpoints" / "step-000002" / "adapter.safetensors"))
    last = load_file(str(run / "checkpoints" / "step-000004" / "adapter.safetensors"))
    final = load_file(str(run / "final" / "adapter.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)
    for rank in (0, 1):  # the live model of every rank (FSDP: gathered from the shards) is the best adapter
        dumped = load_file(str(run / f"rank{rank}.safetensors"))
        gathered = {k.removeprefix("gathered::"): v for k, v in dumped.items() if k.startswith("gathered::")}
        assert gathered and all(torch.equal(v, best[k]) for k, v in gathered.items()), rank
