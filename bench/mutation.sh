#!/usr/bin/env bash
# Mutation testing (mutmut 3): how many small deliberate breaks of each module below its tests catch.
#
#   pip install mutmut            # not a project dependency: nothing in the suite needs it
#   bench/mutation.sh             # every module below, in this order
#   bench/mutation.sh schedule flops   # some of them
#
# It works in a throwaway git worktree of HEAD ($MUT_DIR, default /tmp/kla-mutation; commit first),
# never in this checkout: mutmut writes a mutated copy of the sources there. One module at a
# time, one mutant at a time (--max-children 1), under nice; each mutant runs only the tests
# below that reached the mutated function, with -x and a per-mutant CPU-time limit (mutmut's:
# 2 x timeout_multiplier x the tests' own time). Results: the table printed at the end, and per
# module $MUT_DIR/<module>.txt (counts, then every surviving mutant's diff). MUT_BASELINE=1 leaves
# out the tests/test_mutants_*.py files, written to kill this run's survivors (the "before" rate). The last report is in
# bench/README.md ("Mutation testing").
set -euo pipefail

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
dir=${MUT_DIR:-/tmp/kla-mutation}

# module -> source file, tests that exercise it, and (where the file holds more) the functions to mutate.
declare -A FILE TESTS ONLY
# Unit-level tests only: the model-building and multi-process runs that also reach these modules
# take 30 s to minutes each, times hundreds of mutants on a 2-core machine.
FILE[param_groups]=kla_megatron/training/param_groups.py
TESTS[param_groups]="tests/test_mutants_param_groups.py tests/test_paper_configs.py::test_default_policy_changes_nothing"
FILE[schedule]=kla_megatron/training/schedule.py
TESTS[schedule]="tests/test_mutants_schedule.py tests/test_config.py::test_schedules tests/test_paper_configs.py::test_schedule_is_constant_then_linear_to_zero_over_the_last_40_percent"
FILE[data]=kla_megatron/training/data.py
TESTS[data]="tests/test_mutants_data.py tests/test_documents.py"
FILE[checkpoint]=kla_megatron/checkpoint/directory.py
# test_run_lock_refuses_a_live_holder_and_takes_over_stale_ones is left out: the child process it
# starts outlives mutmut's first (in-process) test run, and mutmut's reaper then fails on its pid.
TESTS[checkpoint]="tests/test_mutants_checkpoint.py tests/test_mutants_checkpoint_lock.py tests/test_checkpoint_prune_resume.py::test_prune_keeps_the_newest_complete_checkpoints"
FILE[flops]=kla_megatron/models/flops.py
TESTS[flops]="tests/test_mutants_flops.py tests/test_model_config.py::test_named_config_has_nominal_size tests/test_model_config.py::test_scan_flops_per_lane_from_the_information_form tests/test_model_config.py::test_flops_count_the_scan_and_attention"
# discretize lives in ops/kla_core.py next to the filter; only its own mutants are run.
FILE[discretize]=kla_megatron/ops/kla_core.py
TESTS[discretize]="tests/test_ops_api.py::test_discretize_matches_ou_moments tests/test_ops_api.py::test_discretize_smallest_step_is_1e7"
ONLY[discretize]="kla_megatron.ops.kla_core.x_discretize__mutmut_*"
FILE[inputs]=data_tools/inputs.py
TESTS[inputs]="tests/test_mutants_inputs.py tests/test_data_inputs.py::test_directory_and_glob_inputs_sorted tests/test_data_inputs.py::test_parquet_nulls_and_non_strings_are_bad_rows tests/test_data_tools.py::test_bad_input_fail_policy"
ORDER=(schedule param_groups flops discretize data inputs checkpoint)

modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=("${ORDER[@]}")
for m in "${modules[@]}"; do
    [ -n "${FILE[$m]:-}" ] || { echo "unknown module '$m' (known: ${ORDER[*]})" >&2; exit 2; }
done
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install mutmut" >&2; exit 2; }

if [ -e "$dir/.git" ]; then
    git -C "$dir" checkout -q --detach "$(git -C "$repo" rev-parse HEAD)"
else
    git -C "$repo" worktree add -q --detach "$dir" HEAD
fi
cd "$dir"

report() {  # verdict counts for the mutants of file $1 matching glob $2, then each one not killed with its diff
    nice -n 19 python - "$1" "$2" <<'EOF'
import fnmatch, json, sys
from mutmut.__main__ import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
path, pattern = sys.argv[1], sys.argv[2]
verdicts = {key: status_by_exit_code[code]
            for key, code in json.load(open(f"mutants/{path}.meta"))["exit_code_by_key"].items()
            if fnmatch.fnmatch(key, pattern)}
counts = {}
for verdict in verdicts.values():
    counts[verdict] = counts.get(verdict, 0) + 1
caught = counts.get("killed", 0) + counts.get("timeout", 0)
tested = sum(counts.values()) - counts.get("not checked", 0) - counts.get("skipped", 0)
rate = 100 * caught / tested if tested else 0.0
print(f"{rate:5.1f}% killed ({caught}/{tested})  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
for key, verdict in verdicts.items():
    if verdict not in ("killed", "timeout"):
        print(f"\n# {key}: {verdict}\n{get_diff_for_mutant(key, path=path)}")
EOF
}

table=()
for m in "${modules[@]}"; do
    file=${FILE[$m]}
    read -r -a tests <<<"${TESTS[$m]}"
    existing=()
    for t in "${tests[@]}"; do
        [ -e "${t%%::*}" ] || continue
        [ -n "${MUT_BASELINE:-}" ] && [[ $t == tests/test_mutants_* ]] && continue
        existing+=("$t")
    done
    rm -rf mutants setup.cfg
    {
        echo "[mutmut]"
        printf 'source_paths =\n    kla_megatron\n    data_tools\n'
        echo "only_mutate = $file"
        printf 'pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n    --timeout=600\n'
        echo "pytest_add_cli_args_test_selection ="
        printf '    %s\n' "${existing[@]}"
        printf 'also_copy =\n    configs\n    bench\n    docs\n    launch\n    README.md\n'
        echo "timeout_multiplier = 5"
    } >setup.cfg
    glob=${ONLY[$m]:-*}
    echo "== $m: $file with ${existing[*]}"
    args=(--max-children 1)
    [ "$glob" = "*" ] || args+=("$glob")
    nice -n 19 mutmut run "${args[@]}" </dev/null | tr '\r' '\n' | grep -v '^\s*$' | tail -3 || true
    report "$file" "$glob" >"$m.report"
    line=$(head -1 "$m.report")
    { echo "$m ($file): $line"; echo "tests: ${existing[*]}"; tail -n +2 "$m.report"; } >"$m.txt"
    rm "$m.report"
    table+=("$(printf '%-13s %s' "$m" "$line")")
done
printf '%s\n' "${table[@]}"
