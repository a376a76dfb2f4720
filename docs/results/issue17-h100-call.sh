#!/usr/bin/env bash
# one call, stages in the order of issue 17's priorities, each under its own timeout
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "== $1 $(( $(date +%s) - T0 ))s"; }
mkdir -p /tmp/site && tar xzf .whl/site-base.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import sys, torch, bitsandbytes, liger_kernel, datasets, peft, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, datasets.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B8=8; [ "$MEM" -lt 100000 ] && B8=4
B="python3 scripts/bench_gpu.py --steps 6 --no-levers --no-track --no-max-batch"
el main
timeout -k 5 190 $B --out $OUT/main.json --methods lora peft-lora peft-lora+autocast qlora peft-qlora 2>&1 | grep -v -i warn | tee -a $OUT/all.log
el snapshots
timeout -k 5 70 $B --out $OUT/snap.json --lever-runs \
  "qwen2.5-0.5b:qlora:bench.fp32_norms=true,compile=cudagraphs,optimizer=adamw,bench.snapshot=true" \
  "qwen2.5-0.5b:qlora:bench.snapshot=true" "qwen2.5-0.5b:qlora:compile=false" 2>&1 | grep -v -i warn | tee -a $OUT/all.log
el 8b
timeout -k 5 150 $B --batch $B8 --out $OUT/8b.json --shapes llama-3.1-8b --methods lora peft-lora qlora peft-qlora 2>&1 | grep -v -i warn | tee -a $OUT/all.log
el unsloth
mkdir -p /tmp/site-unsloth && tar xzf .whl/site-unsloth.tgz -C /tmp/site-unsloth
PYTHONPATH=/tmp/site-unsloth:$PYTHONPATH timeout -k 5 60 python3 scripts/bench_unsloth.py --steps 6 \
  --shapes qwen2.5-0.5b --methods lora qlora --out $OUT/unsloth.json 2>&1 | grep -v -i warn | tail -40 | tee -a $OUT/all.log
el real
timeout -k 5 45 $B --out $OUT/real.json --real qwen2.5-0.5b:chatterbot:6 2>&1 | grep -v -i warn | tee -a $OUT/all.log
el levers
timeout -k 5 $(( 572 - ($(date +%s) - T0) )) $B --out $OUT/levers.json --lever-runs \
  "llama-3.2-1b:lora:activation_memory_budget=0.5" "llama-3.2-1b:lora:model.gradient_checkpointing=true" \
  "llama-3.2-1b:lora:activation_memory_budget=0.3" 2>&1 | grep -v -i warn | tee -a $OUT/all.log
el done
