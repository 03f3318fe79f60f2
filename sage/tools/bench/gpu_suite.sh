#!/usr/bin/env bash
# Every GPU check in one call (a lent GPU's time is scarce): environment, the GPU-only tests,
# the Eq. 1 kernel benchmark (short tile list), batch-1/8 decoding (eager, static, CUDA graph),
# the training-step slice as rank 0 of 8 (micro-batch 2 profiled, 4, 4 with activation
# checkpointing), and last the kernel's split / grid sweep and the compiled decode step. Each
# step has its own time limit and the whole suite a deadline (TOTAL_S, default 580 s: one
# device call of at most 10 minutes), so one hang cannot eat the others and a step that would
# start past the deadline is skipped; every log goes to $OUT (default runs/gpu_suite).
#     bash sage/tools/bench/gpu_suite.sh [STEP ...]   (no argument: all, in this order)
set -u
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-580}
ALL="env tests topk decode train train_b4 train_ac topk_sweep decode_compile"
steps=${*:-$ALL}

run() {  # run NAME LIMIT_S CMD...: tee the output to $OUT/NAME.txt, time it, stop at the deadline
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "### $name: skipped, the suite's ${TOTAL_S} s are spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "### $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "### $name: rc $rc in $((SECONDS - t0)) s"
    return "$rc"
}

for step in $steps; do
    case $step in
        env) run env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,\
memory.total --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \
\"triton\", triton.__version__)'" ;;
        tests) run tests 120 $PY -m pytest -q -rs -p no:cacheprovider tests/kernels \
               tests/models/test_decoding.py ;;
        topk) run topk 130 $PY -m sage.tools.bench.topk_cosine --tiles short ;;
        topk_sweep) run topk_sweep 150 $PY -m sage.tools.bench.topk_cosine --sweep_only ;;
        decode) run decode 110 $PY -m sage.tools.bench.decode --modes eager static graph \
                --profile 12 ;;
        train) run train 90 $PY -m sage.tools.bench.train_step --world 8 --profile 15 ;;
        # if the fake 8-rank world fails on this machine, the one-GPU figure at least
        train_b4) run train_b4 60 $PY -m sage.tools.bench.train_step --world 8 --batch 4 ||
                  run train_b4_world1 60 $PY -m sage.tools.bench.train_step --batch 4 ;;
        train_ac) run train_ac 50 $PY -m sage.tools.bench.train_step --world 8 --batch 4 \
                  --activation_checkpointing ;;
        decode_compile) run decode_compile 120 $PY -m sage.tools.bench.decode --modes compile \
                        --batch 1 ;;
        *) echo "unknown step $step ($ALL)"; exit 2 ;;
    esac
done
echo "### suite: ${SECONDS} s"
