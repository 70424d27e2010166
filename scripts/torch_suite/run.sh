#!/usr/bin/env bash
# Run PyTorch's own batch-norm tests twice, on torch and on bnlab, and compare.
#
#   scripts/torch_suite/run.sh TESTS_DIR [extra pytest args...]
#
# TESTS_DIR holds PyTorch's test files laid out as in PyTorch's test/ folder:
#   TESTS_DIR/test_nn.py  TESTS_DIR/nn/test_lazy_modules.py  TESTS_DIR/test_modules.py
# (missing files are reported and left out). Nothing is written into the repo.
#
# Environment:
#   PYTHON                          interpreter (default: <repo>/.venv/bin/python)
#   BNLAB_TORCH_SUITE_K             pytest -k selection (default: "batchnorm or batch_norm";
#                                   pytest -k is case-insensitive, so BatchNorm* names match too)
#   BNLAB_TORCH_SUITE_TIMEOUT       per-test timeout in s when pytest-timeout is installed (default 900)
#   BNLAB_TORCH_SUITE_OUT           where logs and JSON results go (default $TMPDIR/bnlab_torch_suite)
#   BNLAB_TORCH_SUITE_REUSE_BASELINE=1  reuse OUT/torch.jsonl from an earlier run instead of rerunning torch
#   BNLAB_TORCH_SUITE_MAX_RESTARTS  restarts allowed after a crash, per implementation (default 20)
#
# Exit status: 0 when every test that passes on torch passes on bnlab, 1 when some do not,
# 2 when a run produced no results (crash, bad TESTS_DIR, ...).
set -euo pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 TESTS_DIR [extra pytest args...]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TESTS=$(cd "$1" && pwd)
shift
PY=${PYTHON:-$REPO/.venv/bin/python}
SELECT=${BNLAB_TORCH_SUITE_K:-batchnorm or batch_norm}
OUT=${BNLAB_TORCH_SUITE_OUT:-${TMPDIR:-/tmp}/bnlab_torch_suite}
mkdir -p "$OUT"

FILES=()
for f in test_nn.py nn/test_lazy_modules.py test_modules.py; do
    if [ -f "$TESTS/$f" ]; then FILES+=("$f"); else echo "warning: $TESTS/$f not found, skipped" >&2; fi
done
[ ${#FILES[@]} -gt 0 ] || { echo "no test files in $TESTS" >&2; exit 2; }

# A scratch tree: PyTorch's files and this conftest, side by side, so pytest loads the conftest
# before the test modules. Same layout every run, so test ids match between runs.
RUN=$(mktemp -d "${TMPDIR:-/tmp}/bnlab_torch_suite_run.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
ln -s "$HERE/conftest.py" "$RUN/conftest.py"
for f in "${FILES[@]}"; do
    mkdir -p "$RUN/$(dirname "$f")"
    ln -s "$TESTS/$f" "$RUN/$f"
done
printf '[pytest]\n' > "$RUN/pytest.ini"

ARGS=(-q -p no:cacheprovider -c "$RUN/pytest.ini" --rootdir "$RUN" -k "$SELECT")
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    ARGS+=(--timeout "${BNLAB_TORCH_SUITE_TIMEOUT:-900}")
else
    echo "note: pytest-timeout not installed, running without a per-test timeout" >&2
fi

run_impl() {  # $1 = torch | bnlab; the rest go to pytest
    local impl=$1 start end attempt rc
    shift
    rm -f "$OUT/$impl.jsonl" "$OUT/$impl.log"
    start=$(date +%s)
    echo "== $impl: running (log: $OUT/$impl.log)"
    # A crash (segfault, abort, hard timeout) ends pytest without its "session" record; the
    # conftest then marks the test that was running as crashed and the rerun skips every test
    # already recorded, so one bad test costs a restart, not the run.
    for attempt in $(seq 1 "${BNLAB_TORCH_SUITE_MAX_RESTARTS:-20}"); do
        rc=0
        # (the braces keep bash's own "Segmentation fault" notice out of the output)
        { (cd "$RUN" && BNLAB_TORCH_SUITE_IMPL=$impl BNLAB_TORCH_SUITE_RESULTS="$OUT/$impl.jsonl" \
            "$PY" -m pytest "${ARGS[@]}" "$@" "${FILES[@]}") >> "$OUT/$impl.log" 2>&1; } 2>/dev/null || rc=$?
        if grep -q '"kind": "session"' "$OUT/$impl.jsonl" 2>/dev/null; then break; fi
        if ! grep -q '"kind": "start"' "$OUT/$impl.jsonl" 2>/dev/null; then
            echo "   $impl: pytest exited ($rc) before running any test; see the log" >&2
            break
        fi
        echo "   $impl: pytest died (exit $rc), restarting after the test it was running"
    done
    end=$(date +%s)
    echo "   $impl: $((end - start)) s"
}

if [ "${BNLAB_TORCH_SUITE_REUSE_BASELINE:-0}" = 1 ] && [ -f "$OUT/torch.jsonl" ]; then
    echo "== torch: reusing $OUT/torch.jsonl"
else
    run_impl torch "$@"
fi
run_impl bnlab "$@"

"$PY" - "$OUT" "$SELECT" "${FILES[@]}" <<'PYEOF'
import json, os, sys

out, select, files = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = {}
for impl in ("torch", "bnlab"):
    path = os.path.join(out, impl + ".jsonl")
    tests, collected, exits, finished = {}, 0, [], False
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record["kind"] == "result":
                    tests[record["nodeid"]] = record
                elif record["kind"] == "session":
                    collected, finished = record["collected"], True
                    exits.append(record["exitstatus"])
    except OSError:
        pass
    if not finished:
        print(f"\n{impl}: no complete results in {path}; last lines of {impl}.log:")
        try:
            with open(os.path.join(out, impl + ".log")) as f:
                print("".join(f.readlines()[-25:]))
        except OSError:
            pass
        sys.exit(2)
    runs[impl] = {"tests": tests, "collected": collected, "exit": exits[-1]}

print(f"\nselection: -k {select!r} over {' '.join(files)}")
kinds = ("passed", "failed", "skipped", "xfailed", "xpassed", "crashed")
print(f"{'impl':<6} {'collected':>9} " + " ".join(f"{k:>8}" for k in kinds))
for impl, r in runs.items():
    counts = {}
    for e in r["tests"].values():
        counts[e["outcome"]] = counts.get(e["outcome"], 0) + 1
    print(f"{impl:<6} {r['collected']:>9} " + " ".join(f"{counts.get(k, 0):>8}" for k in kinds))

base, new = runs["torch"]["tests"], runs["bnlab"]["tests"]
regressions = sorted(t for t, e in base.items()
                     if e["outcome"] == "passed" and new.get(t, {}).get("outcome") != "passed")
print(f"\npass on torch but not on bnlab: {len(regressions)}")
for t in regressions:
    e = new.get(t, {"outcome": "not run", "reason": "absent from the bnlab run"})
    print(f"  {t}\n      {e['outcome']}: {e['reason']}")
gains = sorted(t for t, e in new.items()
               if e["outcome"] == "passed" and base.get(t, {}).get("outcome") != "passed")
if gains:
    print(f"\npass on bnlab but not on torch (for information): {len(gains)}")
    for t in gains:
        e = base.get(t, {"outcome": "not run", "reason": ""})
        print(f"  {t}  [torch: {e['outcome']}: {e['reason']}]")
sys.exit(1 if regressions else 0)
PYEOF
