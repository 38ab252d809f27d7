#!/usr/bin/env bash
# Run every GPU test (pytest -m gpu) and write the result as a bench/README.md entry:
# date, GPU, driver, versions, commit, command and pytest's summary (failures in full).
#   bash bench/gpu_tests.sh                 # entry in $OUT/gpu_tests.md (default ./outputs)
#   bash bench/gpu_tests.sh --append        # ... and appended to bench/README.md
# Extra pytest arguments go after `--` (e.g. -- -k triton). Run it after every kernel change.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-outputs}
mkdir -p "$OUT"
append=0
if [ "${1:-}" = "--append" ]; then append=1; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import megatron.core" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/megatron_core-*.whl || exit 1

cmd=(python3 -m pytest -v -p no:cacheprovider -m "gpu or multigpu" -rfEs "$@")
# TIMEOUT_S bounds the whole run; the entry is written either way (exit code 124: cut short)
timeout "${TIMEOUT_S:-3600}" "${cmd[@]}" > "$OUT/gpu_tests.log" 2>&1
rc=$?
{
  echo
  echo "### GPU tests, $(date -u '+%Y-%m-%d %H:%M UTC') (bench/gpu_tests.sh)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | sort | uniq -c
  python3 -c "import sys, torch, triton, megatron.core as m; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| megatron-core', m.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  echo "\$ $(printf '%q ' "${cmd[@]}")"
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error" "$OUT/gpu_tests.log" | tail -40
  if [ "$rc" = 124 ]; then
    echo "stopped after TIMEOUT_S=${TIMEOUT_S:-3600} s: $(grep -c ' PASSED' "$OUT/gpu_tests.log") passed, $(grep -c ' SKIPPED' "$OUT/gpu_tests.log") skipped so far"
    grep -E ' (FAILED|ERROR)' "$OUT/gpu_tests.log" | head -20
  fi
  echo "exit code $rc"
  echo '```'
} > "$OUT/gpu_tests.md"
cat "$OUT/gpu_tests.md"
if [ "$append" = 1 ]; then cat "$OUT/gpu_tests.md" >> bench/README.md; fi
exit "$rc"
