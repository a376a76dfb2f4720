"""scripts/bench_distributed.py runs end to end on CPU (gloo, torchrun, 2 processes, the tiny Llama
shape): a 1-process and a DDP row, and the loss check at the same global batch (fp32: the same losses)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_distributed.py"


def test_cpu_smoke_trains_through_torchrun_and_compares_losses(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--shapes", "tiny-llama", "--methods", "lora",
                           "--modes", "ddp", "--steps", "4", "--warmup", "1", "--max-batch",
                           "--loss-check", "tiny-llama:lora:ddp", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    single, ddp = results["rows"]
    assert "error" not in single and "error" not in ddp, results["rows"]
    assert (single["gpus"], ddp["gpus"], ddp["ran"]) == (1, 2, "ddp")
    assert single["timed_steps"] == ddp["timed_steps"] == 3 and single["tokens_per_s"] > 0
    assert ddp["scaling_efficiency"] == ddp["tokens_per_s"] / (2 * single["tokens_per_s"])
    assert len(ddp["peak_gib_per_rank"]) == 2
    check, = results["loss_checks"]
    assert (check["batch_1gpu"], check["batch_per_gpu"], check["steps"]) == (2, 1, 4)
    assert check["max_abs_diff"] < 1e-4  # fp32 on CPU: the same rows give the same losses
    assert "| tiny-llama | lora | 2 GPUs, DDP |" in done.stdout
