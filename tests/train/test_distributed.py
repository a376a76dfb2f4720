"""Several processes (gloo, CPU, fp32): 2 processes at 2 rows each give one process's numbers at 4 rows,
for every method under DDP and the shardable ones under FSDP2; checkpoints move between world sizes;
a failing rank ends the job. The 2-process jobs run every case in one spawn (tests/train/dist_jobs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.data.batches import Blank, MicroBatches
from lorakit.train.distributed import resolve_mode
from lorakit.train.run import batch_line, check_world_size
from lorakit.world import World
from tests.helpers import pad_collate, toy_data
from tests.train import dist_jobs
from tests.train.test_loop import losses

TOL = 1e-4  # the bound for CPU/gloo fp32


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: Path, want: Path, steps=None) -> float:
    """Losses, gradient norms and the final evaluation of two runs agree within TOL; returns the
    largest |loss difference|."""
    a, b = rows(got), rows(want)
    la, lb = losses(got), losses(want)
    for step in steps or lb:
        assert la[step] == pytest.approx(lb[step], abs=TOL), (got, step)
    norms = {r["step"]: r["grad_norm"] for r in b if "grad_norm" in r}
    for r in a:
        if "grad_norm" in r and r["step"] in norms:
            assert r["grad_norm"] == pytest.approx(norms[r["step"]], rel=1e-3), (got, r["step"])
    evals = [r for r in a if "eval_loss" in r], [r for r in b if "eval_loss" in r]
    for x, y in zip(*evals):
        for key in ("eval_loss", "accuracy", "macro_f1"):
            if key in y:
                assert x[key] == pytest.approx(y[key], abs=TOL), (got, key)
    return max(abs(la[s] - lb[s]) for s in (steps or lb))


@pytest.fixture(scope="module")
def qfolder(tmp_path_factory):
    from tests.test_quant import save_tiny

    path = tmp_path_factory.mktemp("qllama")
    save_tiny(path)
    return path


def reference_runs(root: Path, qfolder: Path, cases) -> None:
    for case in cases:
        dist_jobs.make(root, case, World(), save_every=3 if case == "lora" else None, qfolder=qfolder).train()


def spawn(root: Path, mode: str, qfolder, reference: Path, deadline_s: float = 300) -> None:
    """Run :func:`dist_jobs.job` on 2 forked processes (:func:`spawn_job`)."""
    root.mkdir(parents=True, exist_ok=True)
    spawn_job(dist_jobs.job, (str(root), mode, str(qfolder) if qfolder else None, str(reference)), deadline_s)


def spawn_job(job, args: tuple, deadline_s: float = 300) -> None:
    """Run ``job(rank, *args)`` on 2 forked processes; a rank that raises ends both (re-raised here), and a
    job past ``deadline_s`` is killed and fails the test."""
    context = mp.start_processes(job, args=args, nprocs=2, join=False, start_method="fork")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process job {args} ran past {deadline_s} s")


def check_resumes(root: Path, reference: Path, qfolder: Path) -> None:
    """2-process checkpoint → 1 process, and 1-process checkpoint → 2 processes: the same losses."""
    one = dist_jobs.resume(root, "lora", World(), root / "lora" / "checkpoints" / "step-000003", "lora_to_1")
    assert sorted(losses(root / "lora_to_1")) == [4, 5] and one.step == dist_jobs.STEPS
    assert_same_run(root / "lora_to_1", reference / "lora", steps=[4, 5])
    assert_same_run(root / "lora_from_1", reference / "lora", steps=[4, 5])


def test_ddp_matches_one_process_for_every_method(tmp_path, qfolder):
    reference, root = tmp_path / "one", tmp_path / "ddp"
    reference_runs(reference, qfolder, dist_jobs.CASES)
    spawn(root, "ddp", qfolder, reference)
    worst = {case: assert_same_run(root / case, reference / case) for case in dist_jobs.CASES}
    print("max |loss difference| DDP vs one process:", worst)
    for case in dist_jobs.CASES:  # every rank ends with the same adapter (Delta-LoRA's snapshots included)
        r0, r1 = load_file(str(root / case / "rank0.safetensors")), load_file(str(root / case / "rank1.safetensors"))
        assert all(torch.equal(r0[k], r1[k]) for k in r0), case
        final, want = load_file(str(root / case / "final/adapter.safetensors")), load_file(str(reference / case / "final/adapter.safetensors"))
        assert final.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(final[key], want[key], rtol=0, atol=TOL)
    ranks = [json.loads((root / f"dylora_ranks{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(set(ranks[0])) > 1  # DyLoRA: one rank drawn per step, on every rank
    kept = [json.loads((root / "lora_drop" / f"kept{r}.json").read_text()) for r in (0, 1)]
    assert kept[0] == kept[1] == json.loads((reference / "lora_drop/lora_drop_selection.json").read_text())["kept"]
    check_resumes(root, reference, qfolder)
    # with dropout, a 2-process resume draws every rank's masks as the uninterrupted run did
    again, whole = losses(root / "dropout_resumed"), losses(root / "dropout")
    assert sorted(again) == [4, 5] and [again[4], again[5]] == pytest.approx([whole[4], whole[5]], abs=1e-6)


def test_fsdp_matches_one_process_and_saves_the_whole_adapter(tmp_path, qfolder):
    reference, root = tmp_path / "one", tmp_path / "fsdp"
    reference_runs(reference, qfolder, dist_jobs.FSDP_CASES)
    spawn(root, "fsdp", qfolder, reference)
    worst = {case: assert_same_run(root / case, reference / case) for case in dist_jobs.FSDP_CASES}
    print("max |loss difference| FSDP vs one process:", worst)
    for case in dist_jobs.FSDP_CASES:
        saved = load_file(str(root / case / "final/adapter.safetensors"))
        dumped = load_file(str(root / case / "rank0.safetensors"))
        gathered = {k.removeprefix("gathered::"): v for k, v in dumped.items() if k.startswith("gathered::")}
        if case == "qlora":  # the 4-bit base itself was sharded (packed uint8 DTensor), not only the adapter
            assert (root / case / "base_sharded").read_text() == "DTensor uint8"
        assert gathered and all(torch.equal(saved[k], v) for k, v in gathered.items()), case  # whole, not a shard
        want = load_file(str(reference / case / "final/adapter.safetensors"))
        assert saved.keys() == want.keys()
        for key in want:
            assert saved[key].shape == want[key].shape
            torch.testing.assert_close(saved[key], want[key], rtol=0, atol=TOL)
    check_resumes(root, reference, qfolder)


# ---- pieces, on one process ---------------------------------------------------------------------------
def test_shares_of_a_global_batch_cover_it_once_and_blank_the_empty_one():
    data = toy_data(n_train=5)
    whole = MicroBatches(data.train, pad_collate, 4, seed=3)
    shares = [MicroBatches(data.train, pad_collate, 4, seed=3, rank=r, size=2) for r in (0, 1)]

    def examples(batch) -> list:
        return [] if isinstance(batch, Blank) else [ids[m == 1].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]

    for k in range(2):  # the shares of micro-batch k are its rows, each once, in order
        assert examples(shares[0][k]) + examples(shares[1][k]) == examples(whole[k])
    last = shares[1][1]  # 1 row left: rank 1 gets a blank batch that carries no loss
    assert isinstance(last, Blank) and bool((last["labels"] == -100).all())


def test_resume_on_another_world_size_needs_the_same_global_micro_batch(tmp_path):
    saved = {"train": {"batch_size": 4}}
    check_world_size(saved, {"train": {"batch_size": 8}}, 2, World(), tmp_path)
    assert saved["train"]["batch_size"] == 8
    with pytest.raises(LorakitError, match=r"4 × 1 = 4; pass train.batch_size=8"):
        check_world_size({"train": {"batch_size": 4}}, {"train": {"batch_size": 4}}, 2, World(), tmp_path)


def test_batch_line_and_unshardable_methods_say_so():
    from lorakit.config import recipe_from_dict
    from lorakit.methods import build_method

    recipe = recipe_from_dict({"train": {"batch_size": 4, "gradient_accumulation_steps": 2}})
    assert batch_line(recipe, World(rank=0, size=2, mode="ddp")) == \
        "batch: 4 per device × 2 accumulation × 2 processes, DDP = 16 rows per step"
    world, note = resolve_mode(World(rank=0, size=2, mode="ddp"), "fsdp", build_method(recipe_from_dict({"method": {"name": "dylora"}}).method))
    assert world.mode == "ddp" and note.startswith("train.distributed fsdp: dylora cannot run sharded")
    assert resolve_mode(World(), "auto", build_method(recipe.method)) == (World(), None)


def tiny_recipe(tmp_path, batch_size: int = 2, **train) -> Path:
    """A recipe over a tiny saved Llama and its word data (tests/test_quant.py), fp32, no dropout."""
    from tests.test_quant import save_tiny

    save_tiny(tmp_path, texts=24)
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tmp_path}}}\nmethod: {{name: lora, r: 2, lora_dropout: 0.0}}\n"
                      f"data: {{source: {tmp_path / 'data.jsonl'}, format: text, max_seq_length: 16}}\n"
                      f"train: {{batch_size: {batch_size}, max_steps: 4, num_samples: 0, precision: fp32{extra}}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    return recipe


def test_cli_two_processes_then_eval_and_resume_on_one(tmp_path):
    """``lorakit train --nproc-per-node 2`` (torchrun), then ``eval`` and a 1-process ``--resume`` at the
    same global batch through the command line: the run folder is an ordinary one."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    recipe = tiny_recipe(tmp_path, save_every=2)
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(recipe), "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch: 2 per device × 1 accumulation × 2 processes, DDP = 4 rows per step" in done.stdout + done.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    evaluated = CliRunner().invoke(app, ["eval", str(run), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], abs=TOL)
    refused = CliRunner().invoke(app, ["train", str(recipe), "train.max_steps=6", "--resume"])
    assert refused.exit_code == 1 and "pass train.batch_size=4" in refused.output
    resumed = CliRunner().invoke(app, ["train", str(recipe), "train.max_steps=6", "train.batch_size=4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def torchrun_fault(recipe: Path, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAKIT_TEST_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).with_name("dist_fault.py")), "train", str(recipe)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_failing_rank_ends_the_job_in_seconds(tmp_path):
    """torchrun, 2 processes, rank 1 raises at step 2: exit ≠ 0, one line naming the rank, no hang."""
    recipe = tiny_recipe(tmp_path)
    start = time.monotonic()
    done = torchrun_fault(recipe, "raise")
    assert done.returncode != 0
    assert "error: rank 1 of 2 failed: RuntimeError: failure injected at step 2" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - start < 90


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 during step 2: both ranks finish step 2, write one checkpoint, and stop;
    one process resumes it (same global batch) to the end."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    recipe = tiny_recipe(tmp_path)
    done = torchrun_fault(recipe, "signal")
    assert done.returncode != 0 and "stopped (SIGTERM) at step 2" in done.stderr, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert sorted(losses(run)) == [1, 2]
    resumed = CliRunner().invoke(app, ["train", str(recipe), "train.batch_size=4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_nproc_per_node_runs_torchrun_with_the_same_command():
    from lorakit.launch import torchrun_args

    assert torchrun_args(2, ["r.yaml", "train.max_steps=3", "--resume"], verbose=True) == [
        "--standalone", "--nproc-per-node=2", "-m", "lorakit", "--verbose", "train", "r.yaml", "train.max_steps=3", "--resume"]


def test_nproc_per_node_refuses_a_bad_recipe_before_starting_processes(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {distributed: zero}\n")
    result = CliRunner().invoke(app, ["train", str(bad), "--nproc-per-node", "2"])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "train.distributed" in result.output
