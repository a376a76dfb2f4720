"""scripts/bench_distributed.py runs end to end on CPU (gloo, torchrun, the tiny Llama shape): its loss
check trains 1 process at batch 2 and 2 DDP processes at batch 1 each, the same rows (fp32: the same
losses). Two torchrun jobs; the full smoke is ``python scripts/bench_distributed.py --cpu-smoke``."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_distributed.py"


def test_cpu_smoke_loss_check_trains_through_torchrun(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--no-rows", "--steps", "4", "--warmup", "1",
                           "--loss-check", "tiny-llama:lora:ddp", "--max-batch", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check, = json.loads(out.read_text())["loss_checks"]
    assert "error" not in check, check
    assert (check["batch_1gpu"], check["batch_per_gpu"], check["ran"], check["steps"]) == (2, 1, "ddp", 4)
    assert len(check["peak_gib_per_rank"]) == 2  # both ranks reported
    assert check["max_abs_diff"] < 1e-5  # fp32 on CPU, DDP: the same rows give the same losses (measured ~5e-7)
    assert "| tiny-llama lora DDP | 2 | 1 | 4 |" in done.stdout
