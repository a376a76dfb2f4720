#!/usr/bin/env bash
# What issue 17 still needs from one GPU (nvidia-h100-x1 or nvidia-h200), one device call per stage, each
# under the 10-minute limit (durations are estimates from the 2026-12-05 H100 call):
#   bash scripts/gpu_issue17.sh 1   lorakit / PEFT / Unsloth side by side on the same card: bench_gpu rows
#                                   (Qwen2.5-0.5B, Llama-3.2-1B: LoRA, QLoRA, PEFT, PEFT+autocast), then
#                                   bench_unsloth.py with the rest of the call (its first compile ~2-4 min)
#   bash scripts/gpu_issue17.sh 2   real-length data (packed lorakit vs padded PEFT: chatterbot, BBC news),
#                                   Llama-3.1-8B: PEFT+autocast rows and the largest batch (lorakit QLoRA /
#                                   LoRA, PEFT QLoRA), loss tracking vs fp32 (bench_gpu's default track)
#   bash scripts/gpu_issue17.sh 3   bash scripts/gpu_checks.sh (every GPU test, on the new defaults)
# Each stage writes as it goes ($OUT/stage*.json, stage*.log), so a stage cut by its limit keeps what it
# finished. Packages the machine lacks: .whl/site-base.tgz and .whl/site-unsloth.tgz from
# `bash scripts/gpu_prepare.sh` here; carry .whl:  run(command="bash scripts/gpu_issue17.sh 1", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/issue17}
mkdir -p "$OUT"
if [ "${1:-}" = 3 ]; then exec bash scripts/gpu_checks.sh; fi
. scripts/gpu_site.sh
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
B="python3 scripts/bench_gpu.py --steps 6 --no-levers --no-max-batch"
case "${1:-}" in
1) timeout -k 5 200 $B --no-track --out "$OUT/stage1-rows.json" --shapes qwen2.5-0.5b llama-3.2-1b \
       --methods lora peft-lora peft-lora+autocast qlora peft-qlora 2>&1 | grep -v -i warn | tee "$OUT/stage1.log"
   mkdir -p /tmp/site-unsloth && tar xzf .whl/site-unsloth.tgz -C /tmp/site-unsloth
   PYTHONPATH=/tmp/site-unsloth:$PYTHONPATH timeout -k 5 "$(left 570)" python3 scripts/bench_unsloth.py --steps 6 \
       --shapes qwen2.5-0.5b llama-3.2-1b --methods lora qlora --out "$OUT/stage1-unsloth.json" 2>&1 \
       | grep -v -i warn | tail -60 | tee -a "$OUT/stage1.log" ;;
2) MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
   B8=8; [ "$MEM" -lt 100000 ] && B8=4
   timeout -k 5 150 $B --no-track --out "$OUT/stage2-real.json" \
       --real qwen2.5-0.5b:chatterbot:8 llama-3.2-1b:bbc-news-text:8 2>&1 | grep -v -i warn | tee "$OUT/stage2.log"
   timeout -k 5 120 $B --no-track --batch $B8 --out "$OUT/stage2-8b.json" --shapes llama-3.1-8b \
       --methods peft-lora+autocast peft-qlora+autocast 2>&1 | grep -v -i warn | tee -a "$OUT/stage2.log"
   timeout -k 5 200 $B --no-track --out "$OUT/stage2-maxbatch.json" --cap-gib 78 \
       --max-batch llama-3.1-8b:qlora llama-3.1-8b:peft-qlora llama-3.1-8b:lora 2>&1 | grep -v -i warn | tee -a "$OUT/stage2.log"
   timeout -k 5 "$(left 570)" $B --out "$OUT/stage2-track.json" --shapes qwen2.5-0.5b --methods lora \
       2>&1 | grep -v -i warn | tee -a "$OUT/stage2.log" ;;
*) echo "usage: bash scripts/gpu_issue17.sh 1|2|3" >&2; exit 2 ;;
esac
