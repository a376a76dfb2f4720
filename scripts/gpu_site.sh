# Sourced by the scripts/gpu_issue*.sh stages on the GPU machine: the packages it lacks (.whl/site-base.tgz,
# made here by `bash scripts/gpu_prepare.sh`; carry .whl) on PYTHONPATH, and the card in one line.
mkdir -p /tmp/site && tar xzf .whl/site-base.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
