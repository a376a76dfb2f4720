"""``lorakit train`` end to end on CUDA with the default ``train.compile: auto`` (decoder layers replayed
as CUDA graphs): variable-length data (batch widths padded to multiples of 64), evaluation and
checkpoints between steps, samples generated eagerly, ``--resume``, ``eval`` and ``merge``; in fp32 the
losses must equal those of the same run with ``train.compile: false`` within 1e-4 (summation order),
while the adapter lowers the held-out loss by more than 0.1. Skipped without CUDA (CI has none); on a GPU:
``python -m pytest tests/test_cli_gpu.py`` (scripts/gpu_checks.sh runs every GPU test).

``LORAKIT_E2E_COMPILE=1 python -m pytest tests/test_cli_gpu.py`` runs the same flow on CPU with
plain ``torch.compile`` (inductor; needs a C++ compiler, ~1 min), which checks the test itself."""

import json
import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorakit.cli import app
from tests.test_quant import save_tiny

CPU_COMPILE = os.environ.get("LORAKIT_E2E_COMPILE", "") not in ("", "0", "false")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or CPU_COMPILE),
                                                  reason="needs CUDA (or LORAKIT_E2E_COMPILE on CPU)")]
STEPS, TOL = 12, 1e-4  # fp32: compiled and eager differ only in summation order


def write_data(path, n: int = 120) -> None:
    """Runs of consecutive words (w5 w6 …) of 3 to 100 words, so batch widths vary from 4 to 101 tokens."""
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as handle:
        for _ in range(n):
            start, length = int(torch.randint(0, 90, (1,), generator=g)), int(torch.randint(3, 101, (1,), generator=g))
            handle.write(json.dumps({"text": " ".join(f"w{(start + j) % 90}" for j in range(length))}) + "\n")


def train(folder, run, compile_choice, *extra) -> tuple[int, str]:
    recipe = {
        "model": {"name_or_path": str(folder), "task": "causal_lm"},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"source": str(folder / "long.jsonl"), "format": "text", "max_seq_length": 112, "eval_max_examples": 16},
        "train": {"learning_rate": 3e-2, "batch_size": 4, "max_steps": STEPS, "eval_every": 4, "save_every": 4,
                  "num_samples": 1, "lr_scheduler": "constant", "compile": compile_choice, "seed": 0,
                  "precision": "fp32"},  # tight comparisons; the bf16 default: tests/train/test_compiled_gpu.py
        "output_dir": str(run),
    }
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path), *extra])
    return result.exit_code, result.output


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_resume_eval_merge_under_default_compile(tmp_path):
    torch._dynamo.reset()  # compiled code of earlier tests in this process does not count here
    folder = tmp_path / "model"
    save_tiny(folder)
    write_data(folder / "long.jsonl")
    choice = True if CPU_COMPILE else "auto"  # on CPU, auto would not compile

    code, out = train(folder, tmp_path / "eager", False)
    assert code == 0, out
    code, out = train(folder, tmp_path / "compiled", choice)
    assert code == 0, out
    assert "compile×2" in out and (CPU_COMPILE or "CUDA graphs" in out), out
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    worst = max(abs(compiled[s] - eager[s]) / eager[s] for s in eager)
    assert worst < TOL, f"compiled {compiled} vs eager {eager}"
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 0.1, summary  # it learns

    # the same compiled run stopped at step 8 and resumed: steps 9-12 as in the uninterrupted run
    resumed = tmp_path / "resumed"
    code, out = train(folder, resumed, choice, "train.max_steps=8")
    assert code == 0, out
    code, out = train(folder, resumed, choice, "--resume")
    assert code == 0, out
    again = losses(resumed)
    worst = max(abs(again[s] - compiled[s]) / compiled[s] for s in range(9, STEPS + 1))
    assert worst < TOL, f"resumed {again} vs uninterrupted {compiled}"

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "compiled"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], rel=TOL)
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "compiled"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
