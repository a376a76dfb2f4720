#!/usr/bin/env bash
# Packages the GPU machine lacks (it has torch, transformers, peft, accelerate; no registry access),
# downloaded here for its Python 3.12 and unpacked into two trimmed trees, tarred into .whl/:
#   .whl/site-base.tgz     what lorakit and scripts/bench_gpu.py need: bitsandbytes (the CUDA 13.0 library
#                          only: the wheel's other CUDA/ROCm builds are 120 MB), liger-kernel, pydantic (+ core,
#                          annotated-types, typing-inspection), datasets 4 (+ dill, multiprocess), gguf, matplotlib
#                          (a core dependency since this session's run pictures) and its own needs  (~20 MB)
#   .whl/site-unsloth.tgz  Unsloth 2026.10.9 and what its import needs (unsloth_zoo, trl, tyro, diffusers,
#                          torchao, cut_cross_entropy, msgspec, ...; the wheel's web UI "studio/" left out) (~18 MB)
# Usage, from the repository root here:  bash scripts/gpu_prepare.sh   (then name .whl in the call's carry;
# .whl/ must be git-ignored: echo /.whl/ >> .git/info/exclude). On the GPU machine:
#   mkdir -p /tmp/site && tar xzf .whl/site-base.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# (scripts/gpu_checks.sh does this itself), and for Unsloth, in its own process:
#   mkdir -p /tmp/site-unsloth && tar xzf .whl/site-unsloth.tgz -C /tmp/site-unsloth
#   PYTHONPATH=/tmp/site-unsloth:/tmp/site:$PWD python3 scripts/bench_unsloth.py ...
set -euo pipefail
out="$PWD/.whl"
dl=$(mktemp -d)
mkdir -p "$out"
plat="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any"
base="bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0
      typing_inspection==0.4.5 datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
      matplotlib==3.10.7 contourpy==1.4.0 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3
      python-dateutil==4.0.0 pillow==13.0.0"
uns="unsloth==2026.10.9 unsloth_zoo==2026.10.9 tyro==1.0.17 docstring_parser==0.18.0 shtab==1.13.0 typeguard==4.6.1
     trl==1.15.0 diffusers==0.42.1 torchao==0.18.0 cut_cross_entropy==25.1.1 msgspec==0.23.0 json5==0.17.3
     nest_asyncio==1.6.0 structlog==26.1.0 hf_transfer==0.1.9"
for p in $base; do python3 -m pip download -q $plat -d "$dl/base" "$p"; done
for p in $uns; do python3 -m pip download -q $plat -d "$dl/uns" "$p"; done
python3 - "$dl" <<'PY'
import glob, sys, zipfile
root = sys.argv[1]
for part in ("base", "uns"):
    for wheel in glob.glob(f"{root}/{part}/*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for m in z.namelist():
                if m.startswith("studio/") or (m.startswith("bitsandbytes/libbitsandbytes_")
                                               and not m.endswith(("cuda130.so", "cpu.so"))):
                    continue
                z.extract(m, f"{root}/site-{part}")
PY
tar czf "$out/site-base.tgz" -C "$dl/site-base" .
tar czf "$out/site-unsloth.tgz" -C "$dl/site-uns" .
rm -rf "$dl"
ls -la "$out"
