#!/usr/bin/env bash
# Every GPU-only test in one command, for a machine with CUDA (CI has none, so these skip there):
#   tests/train/test_compiled_gpu.py  the default compile (CUDA graphs) vs eager for every method, batch
#                                     widths padded to 64, gradient accumulation, dropout, QLoRA (needs
#                                     bitsandbytes; skipped without it)
#   tests/test_cli_gpu.py             lorakit train / --resume / eval / merge end to end under the default
#                                     compile, on variable-length data, against the same run uncompiled
#   tests/methods/test_ops.py         DoRA's Triton kernels
#   tests/train/test_distributed_gpu.py  torchrun --nproc_per_node 1 gives the single-process losses, and
#                                     train.distributed: fsdp on one process runs the default compiled path
#                                     with the same losses (3 short runs as subprocesses, ~3-5 min)
# Usage, from the repository root:  bash scripts/gpu_checks.sh [pytest arguments, default: tests]
# Packages missing on the machine: .whl/site-base.tgz from scripts/gpu_prepare.sh (unpacked into /tmp/site
# first), or wheels in .whl/ (installed there): lorakit's own needs that the machine lacks (bitsandbytes,
# pydantic, datasets, dill, multiprocess, ...) and liger-kernel (SKIP_WHEELS=1 skips that).
set -euo pipefail
if [ -z "${SKIP_WHEELS:-}" ] && [ -f .whl/site-base.tgz ]; then  # made by scripts/gpu_prepare.sh
    mkdir -p /tmp/site && tar xzf .whl/site-base.tgz -C /tmp/site
    export PYTHONPATH=/tmp/site
elif [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib
import torch
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
for name in ("torch", "transformers", "datasets", "pyarrow", "liger_kernel", "bitsandbytes"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as err:  # report, let the tests say what fails
        print(f"  {name}: {type(err).__name__}: {err}")
PY
# four workers: the tests are mostly compile time (CPU); arguments replace the default selection,
# e.g. `bash scripts/gpu_checks.sh tests/test_cli_gpu.py` to stay within one call's time limit
python3 -m pytest -q -m gpu -p no:cacheprovider -n 4 "${@:-tests}"
