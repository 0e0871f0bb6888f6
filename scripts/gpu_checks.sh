#!/usr/bin/env bash
# GPU checks for a machine with a CUDA GPU (CI has none). Parts, any of:
#   tests    the core matrix, autocast and torch.compile (inductor) on CUDA, and the trainer's engine tests
#            on the GPU (fp16 loss scaling, bf16, resume), about 1 minute on an H100
#   train    the default training job in fp16 and in bf16, and a one-process NCCL torchrun
#   profile  where a GPU training step of the default job spends its time (cProfile, top 40)
#   bench    the step benchmark on the GPU, float32 and bf16 autocast (a few minutes)
#
#   LOG_DIR=/tmp/gpu PYTHON=.venv/bin/python scripts/gpu_checks.sh tests train
#
# Needs the test extras installed (or wheels in .whl/, installed to /tmp/site first, for a machine without
# a package index). Every step has its own time limit; full logs go to LOG_DIR (default /tmp/gpu_checks).
set -uo pipefail
logs=${LOG_DIR:-/tmp/gpu_checks}
py=${PYTHON:-python3}  # the interpreter that has torch (a GPU image: its python3)
mkdir -p "$logs"
if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi -L
"$py" -c "import torch, diffusers, peft, lycoris, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

step() {  # step NAME SECONDS COMMAND…: run with a limit, log, say how it went
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s"
    grep -E "^(FAILED|ERROR|E  )|passed|failed|trained|concept score|Error" "$logs/$name.log" | tail -n 15
}

for part in "$@"; do
    case $part in
    tests)
        workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist where installed
        # shellcheck disable=SC2086
        step cuda-tests 300 env BEYONDLORA_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider $workers \
            tests/algorithms/test_core_matrix.py tests/host/test_autocast_compile.py tests/ops/test_merged_step.py \
            tests/host/test_cost_model.py tests/training/test_train_engine.py ;;
    train)
        for precision in fp16 bf16; do
            step "train-$precision" 150 "$py" -m beyondlora train --output-dir "/tmp/run-$precision" \
                --mixed-precision "$precision"
        done
        step torchrun-nccl 120 "$py" -m torch.distributed.run --nproc_per_node 1 -m beyondlora train --output-dir /tmp/run-nccl \
            --max-steps 10 --mixed-precision bf16 ;;
    profile)
        step profile 150 "$py" -m cProfile -s tottime -m beyondlora train --output-dir /tmp/run-profile \
            --max-steps 40 --sample-every 0
        grep -A 45 "Ordered by" "$logs/profile.log" | head -n 45 ;;
    bench)
        step bench-fp32 280 "$py" benchmarks/bench_step.py --device cuda --batch 16 --reps 30 --warmup 5 \
            --output "$logs/bench-fp32.md"
        step bench-bf16 240 "$py" benchmarks/bench_step.py --device cuda --batch 16 --reps 30 --warmup 5 \
            --autocast bf16 --no-unet --output "$logs/bench-bf16.md" ;;
    *) echo "unknown part $part (tests, train, profile, bench)" && exit 2 ;;
    esac
done
