#!/usr/bin/env bash
# A benchmark on an earlier revision and on the working tree, one after the other in one run.
#
#   bash benchmarks/before_after.sh REV benchmarks/bench_bn.py --no-compile-cost
#
# The earlier revision is checked out into a temporary worktree and runs its
# own copy of the benchmark against its own bnlab (PYTHONPATH); then the
# working tree runs the same command. Both print their tables; nothing is
# recorded (pass --record yourself to record the "after" one).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: before_after.sh REV BENCHMARK [ARGS...]}
shift
python=${PYTHON:-.venv/bin/python}
tree=$(mktemp -d "${TMPDIR:-/tmp}/bnlab-before.XXXXXX")
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git worktree add --detach --force "$tree" "$rev" >/dev/null
echo "== before: $(git rev-parse --short "$rev") ($*)"
(cd "$tree" && PYTHONPATH="$tree/src" "$OLDPWD/$python" "$@")
echo
echo "== after: working tree on $(git rev-parse --short HEAD) ($*)"
PYTHONPATH="$PWD/src" "$python" "$@"
