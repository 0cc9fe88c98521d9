#!/usr/bin/env bash
# One prepared check of the Triton kernels on a CUDA machine (about 3-5 minutes, at most 8):
#   1. tests/test_kernels.py with compiled Triton on CUDA tensors (TRITON_INTERPRET=0),
#   2. python -m bench.kernel_bench: GB/s of fused_dp_step / perturb vs a plain copy, and
#      ghost_sq_norms (Triton vs torch Grams) on GPT-2-sized layers.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else /tmp/dplis-gpu-check)
# Writes OUT_DIR/{env.txt,pytest.log,kernel_tests.xml,bench.log,kernels.json}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/dplis-gpu-check}}"
mkdir -p "$OUT_DIR"
export TRITON_INTERPRET=0  # compiled kernels (tests/conftest.py would default it to 1)
export PYTHONUNBUFFERED=1

# torch with CUDA is assumed present; without network fall back to the package alone
timeout 60 python -m pip install -q -e ".[test]" \
  || timeout 30 python -m pip install -q --no-deps --no-build-isolation -e . \
  || echo "WARNING: pip install failed; using the environment as it is"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
} | tee "$OUT_DIR/env.txt"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
# dplis imports its runtime deps (prv-accountant, scipy, ...): fail clearly if pip could not
python -c "import dplis.kernels, pytest, triton" \
  || { echo "gpu_check: dplis or its test deps are not importable (offline pip?)"; exit 3; }

status=0
timeout 240 python -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider \
  --durations=10 --junitxml="$OUT_DIR/kernel_tests.xml" 2>&1 | tee "$OUT_DIR/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 150 python -m bench.kernel_bench --device cuda --json "$OUT_DIR/kernels.json" 2>&1 \
  | tee "$OUT_DIR/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: exit $status (results in $OUT_DIR)"
exit $status
