"""One GPU, the distributed paths (``scripts/gpu_checks.sh`` runs this; skipped without CUDA):

- ``torchrun --nproc_per_node 1 -m lorakit train`` gives the single-process numbers (same code path:
  a world of one), under the default ``train.compile: auto`` (CUDA graphs);
- ``train.distributed: fsdp`` on one process (a process group of one, the model wrapped by
  ``fully_shard``) runs the default compiled path (plain compile: no CUDA graphs around FSDP's
  collectives) and gives the same losses in fp32 within 1e-4.

``LORAKIT_E2E_COMPILE=1 python -m pytest tests/train/test_distributed_gpu.py`` runs it on CPU (plain
compile; checks the test itself, ~3 min)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.test_cli_gpu import write_data
from tests.test_quant import save_tiny

CPU_COMPILE = os.environ.get("LORAKIT_E2E_COMPILE", "") not in ("", "0", "false")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or CPU_COMPILE),
                                                  reason="needs CUDA (or LORAKIT_E2E_COMPILE on CPU)")]
STEPS, TOL = 8, 1e-4


def run(tmp_path, name: str, launcher: list[str], *overrides: str) -> tuple[dict[int, float], str]:
    """(losses by step, output) of ``lorakit train`` on the tiny model through ``launcher``."""
    folder = tmp_path / "model"
    recipe = {
        "model": {"name_or_path": str(folder)},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"source": str(folder / "long.jsonl"), "format": "text", "max_seq_length": 112, "eval_max_examples": 16},
        "train": {"learning_rate": 3e-2, "batch_size": 4, "max_steps": STEPS, "num_samples": 1,
                  "lr_scheduler": "constant", "seed": 0, "precision": "fp32"},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cpu = [] if torch.cuda.is_available() else ["train.compile=true"]  # CPU: auto would not compile
    done = subprocess.run([*launcher, "train", str(path), *overrides, *cpu], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, done.stdout + done.stderr


def test_torchrun_one_process_and_fsdp_one_process_give_the_single_process_losses(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_tiny(folder)
    write_data(folder / "long.jsonl")
    lorakit = [sys.executable, "-m", "lorakit"]
    single, out = run(tmp_path, "single", lorakit)
    torchrun, out_t = run(tmp_path, "torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node=1", "-m", "lorakit"])
    fsdp, out_f = run(tmp_path, "fsdp", lorakit, "train.distributed=fsdp")
    assert "compile×2" in out and "compile×2" in out_t  # the default compiled path in each
    assert "FSDP" in out_f and "compile×2" in out_f and "CUDA graphs" not in out_f
    print("max |loss difference| torchrun 1 / FSDP 1 vs one process:",
          max(abs(torchrun[s] - single[s]) for s in single), max(abs(fsdp[s] - single[s]) for s in single))
    for step in single:
        assert torchrun[step] == pytest.approx(single[step], abs=TOL)
        assert fsdp[step] == pytest.approx(single[step], abs=TOL)
