#!/usr/bin/env bash
# One GPU session for the speed/memory work, in the order that matters if time runs out:
# kernel correctness on the GPU, the scan benchmark, then the model benchmark (bench_model.py).
# Run from the repository root on a GPU machine; OUT (default ./outputs) receives the logs.
#   bash bench/gpu_session.sh [bench_model.py arguments...]
# megatron-core is installed from .whl/ when it is missing (see bench/README.md).
set -uo pipefail
OUT=${OUT:-outputs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import kla_megatron from this checkout
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import megatron.core" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/megatron_core-*.whl || exit 1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m "${TEST_M:-gpu}" -k "${TEST_K:-}" \
  tests/test_ops_glue.py tests/test_ops_conv.py tests/test_ops_triton.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
timeout "${SCAN_S:-60}" python3 bench/bench_scan.py --backends triton \
  --shapes "4,2048,4096,16;2,4096,4096,16;8,4096,4096,16;4,2048,4096,32" --out "$OUT/bench_scan.json" 2>&1 | tail -8
timeout "${MODEL_S:-330}" python3 bench/bench_model.py --out "$OUT/bench_model.json" "$@" 2>&1 |
  tee "$OUT/bench_model.log" | tail -30
