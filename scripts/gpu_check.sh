#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run of about 8 minutes, installing nothing:
# the CUDA, Triton, BN + ReLU and stacked-run tests on the GPU, the GPU benchmark
# (bench_bn.py --device cuda), and the default comparison's time (cold and warm Triton
# cache). Needs torch with CUDA, triton, numpy, pytest and hypothesis; the rest of the
# experiment extra (matplotlib, tqdm) only for the comparison, skipped without them.
#
#   bash scripts/gpu_check.sh [OUT_DIR]     (default: gpu-results/)
#
# Logs go to OUT_DIR: tests.log, bench.md, compare-cold.log, compare-warm.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/device.txt"

timeout 240 python -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda.py tests/test_triton.py tests/test_batchnorm_relu.py \
    tests/test_experiment_stacked.py 2>&1 | tee "$out/tests.log"

timeout 180 python benchmarks/bench_bn.py --device cuda --rounds 15 2>&1 | tee "$out/bench.md"

materializer=../shared/data/cifar10/materialize.py
if [ -z "${BNLAB_DATA:-}" ] && [ -f "$materializer" ]; then
    python "$materializer" .data && export BNLAB_DATA="$PWD/.data"
fi
if python -c "import matplotlib, tqdm" 2>/dev/null && [ -n "${BNLAB_DATA:-}" ]; then
    export TRITON_CACHE_DIR="$(mktemp -d)"  # cold first, then warm
    for run in cold warm; do
        /usr/bin/time -f "$run: %e s" timeout 120 python -m bnlab compare --device cuda \
            --out "runs/gpu-compare-$run" 2>&1 | tail -n 30 | tee "$out/compare-$run.log"
    done
else
    echo "comparison skipped: needs matplotlib, tqdm and CIFAR-10 (\$BNLAB_DATA)" | tee "$out/compare-cold.log"
fi
