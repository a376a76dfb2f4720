#!/usr/bin/env bash
# Issue 16 on a two-GPU machine (nvidia-h100-x2 or nvidia-h200-x2), one device call per stage, each
# under the 10-minute limit (the durations are estimates: nothing has run on two GPUs yet):
#   bash scripts/gpu_issue16.sh 1   Llama-3.2-1B shape: 1 GPU / DDP / FSDP2 x LoRA, DoRA, QLoRA, and the
#                                   2-GPU vs 1-GPU loss checks (LoRA, DDP and FSDP2)          (~6-8 min)
#   bash scripts/gpu_issue16.sh 2   bash scripts/gpu_checks.sh (every GPU test)                (~3-5 min)
#   bash scripts/gpu_issue16.sh 3   the largest batch per GPU, Llama shape, FSDP2 + QLoRA vs
#                                   DDP + LoRA (torchrun job per probe, eager)                (~4-6 min)
#   bash scripts/gpu_issue16.sh 4   Qwen2.5-0.5B shape rows                                   (~5-7 min)
# Stages 1-3 cover every target of the issue; 4 is the second shape. Each writes as it goes, so a stage
# cut by its time limit keeps the rows it finished. Results: $OUT/stage*.json and stage*.log; merge
# the JSON files here with
#   python scripts/bench_distributed.py --merge stage1.json stage3.json stage4.json --out docs/results/issue16.json
# Packages the machine lacks come from .whl/site-base.tgz (bash scripts/gpu_prepare.sh here; carry .whl).
set -uo pipefail
OUT=${OUT:-/tmp/issue16}
mkdir -p "$OUT"
if [ "${1:-}" = 2 ]; then exec bash scripts/gpu_checks.sh; fi
. scripts/gpu_site.sh
B="python3 scripts/bench_distributed.py"
case "${1:-}" in
1) timeout -k 20 570 $B --shapes llama-3.2-1b --max-batch --budget 470 --out "$OUT/stage1.json" 2>&1 \
       | grep -v -i warn | tee "$OUT/stage1.log" ;;
3) timeout -k 20 570 $B --no-rows --loss-check --max-batch-start 32 --budget 500 --out "$OUT/stage3.json" 2>&1 \
       | grep -v -i warn | tee "$OUT/stage3.log" ;;
4) timeout -k 20 570 $B --shapes qwen2.5-0.5b --loss-check --max-batch --budget 470 --out "$OUT/stage4.json" 2>&1 \
       | grep -v -i warn | tee "$OUT/stage4.log" ;;
*) echo "usage: bash scripts/gpu_issue16.sh 1|2|3|4" >&2; exit 2 ;;
esac
