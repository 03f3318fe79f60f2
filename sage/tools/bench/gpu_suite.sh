#!/usr/bin/env bash
# Issue 7's GPU checks in one call (a lent GPU's time is scarce): environment, kernel tests,
# the top-K kernel benchmark, the training-step slice (with and without activation
# checkpointing; the first one profiled) and batch-1 decoding. Each step has its own time limit,
# so one hang cannot eat the others; every log goes to $OUT (default runs/gpu_suite).
#     bash sage/tools/bench/gpu_suite.sh [env decode train train_ac topk tests]   (no argument: all)
set -u
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
steps=${*:-env decode train train_ac topk tests}

run() {  # run NAME LIMIT_S CMD...: tee the output to $OUT/NAME.txt and time it
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "### $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "### $name: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

for step in $steps; do
    case $step in
        env) run env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,\
memory.total --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \
\"triton\", triton.__version__)'" ;;
        tests) run tests 90 $PY -m pytest -q -p no:cacheprovider tests/kernels ;;
        topk) run topk 170 $PY -m sage.tools.bench.topk_cosine --sweep ;;
        train) run train 180 $PY -m sage.tools.bench.train_step --profile 15
               run train_b4 120 $PY -m sage.tools.bench.train_step --batch 4 ;;
        train_ac) run train_ac 120 $PY -m sage.tools.bench.train_step --activation_checkpointing ;;
        decode) run decode 120 $PY -m sage.tools.bench.decode --profile 12 ;;
        *) echo "unknown step $step (env decode train train_ac topk tests)"; exit 2 ;;
    esac
done
