#!/usr/bin/env bash
# Every GPU measurement issues #7 (throughput) and #8 (downstream timing) still need, in one go,
# so that one `device` run (minutes) records them all. Each step runs under its own time limit
# (cut to what is left of GPU_CHECK_BUDGET_S, when set: a step with under 30 s left is skipped
# and logged so); a failed or timed-out step is logged and the next one still runs.
#
# What comes back: a device call returns at most 8 files from $OUT and the last 12,000
# characters of output. So $OUT holds two files: gpu_check.log (each step's command, exit code
# and last 40 lines) and steps.tgz (every step's whole output, steps/<step>.txt), rewritten
# after each step, so a call cut off at its limit still returns the steps it finished.
#
# Here, fill .whl/ (regex for transformers and xxhash for datasets: a venv holding only the
# packages the GPU machine's README lists plus wheels.sh's lacked them; pytest and its
# dependencies for the CUDA-only tests; every step below passed in that venv on a CPU with
# GPU_CHECK_SMOKE=1):
#   ../shared/gpu/wheels.sh regex==2026.11.19 xxhash==4.1.0 pytest==9.2.0 pluggy==1.7.0 \
#       iniconfig==2.3.1 pygments==2.21.0
# then, in one `device` run with carry [".whl"] and timeout_s 560, from the project root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
#       && GPU_CHECK_BUDGET_S=500 OUT=$OUT bash bench/gpu_check.sh
# A session has ~15 minutes of device time, its cold start included, and one call at most 10:
# the steps run in order of importance, and a second call (on the still-warm machine, at once)
# runs those the log says were skipped or cut: GPU_CHECK_ONLY="step step ..." with the budget
# that is left.
# The same steps shrunk to minutes on a CPU (to try the script before spending GPU time):
#   GPU_CHECK_SMOKE=1 OUT=/tmp/gpu-check bash bench/gpu_check.sh
set -u
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
log=$out/gpu_check.log
work=$(mktemp -d)
mkdir -p "$work/steps"
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-0}
started=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        return 0
    fi
    if [ "$budget" -gt 0 ]; then
        local left=$((budget - ($(date +%s) - started)))
        if [ "$left" -lt 30 ]; then
            echo "== $name: skipped: ${left}s of GPU_CHECK_BUDGET_S left" | tee -a "$log"
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name: $* (limit ${limit}s, $(date -u +%FT%TZ))" | tee -a "$log"
    timeout "$limit" "$@" >"$work/steps/$name.txt" 2>&1
    local code=$?
    grep -v -i "warn" "$work/steps/$name.txt" | tail -n 40 | tee -a "$log"
    echo "== $name: exit $code$([ "$code" = 124 ] && echo " (cut at ${limit}s)")" | tee -a "$log"
    tar czf "$work/steps.tgz" -C "$work" steps && mv "$work/steps.tgz" "$out/steps.tgz.part" &&
        mv "$out/steps.tgz.part" "$out/steps.tgz"
}

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    device=cpu
    throughput=(--repeats 1 --cases train-33m sample-33m --train-batch 1 --stories 16
        --sample-batch 8 --max-new-tokens 64)
    determinism=(--preset tinystories-1m --vocab 2048 --steps 2 --batch 2 --accumulate 2 --seq 64)
    downstream=(--repeats 1 --steps 1 --lengths 16,64)
    run=(--generations 1 --stories 300)
    fp32=(--repeats 1 --cases sample-33m --stories 16 --sample-batch 8 --max-new-tokens 64)
    compile=(--repeats 1 --cases train-demo)
    decode=(--vocab 2048 --slots 32 16 --steps 2 --repeats 1 --max-new-tokens 64)
    graphs=(--repeats 1 --cases sample-33m --stories 16 --sample-batch 8 --max-new-tokens 64)
else
    device=cuda
    throughput=(--repeats 10)
    determinism=()
    downstream=(--repeats 10)
    run=()
    fp32=(--repeats 1 --cases sample-33m)
    compile=(--repeats 5 --cases train-33m)
    decode=(--profile)
    graphs=(--repeats 1 --cases sample-33m --stories 4096)
fi

step environment 60 "$python" -c "
import torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
"
command -v nvidia-smi >/dev/null && step nvidia-smi 30 nvidia-smi
# the tests that need CUDA (marked gpu; skipped elsewhere): deterministic training (first:
# its cuBLAS workspace setting must precede every other cuBLAS call), flash decode attention
# against SDPA, CUDA graphs against step-by-step decoding, bf16 sampling
step cuda-tests 150 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py \
    tests/test_fast_model.py tests/test_slot_sampler.py
# #7: one sampling step of a steady 33M pool (1024 and 4096 slots) taken apart: model step
# with flash varlen vs masked SDPA attention, two-level vs full-CDF draw, uniforms; top kernels
step decode-step 120 "$python" bench/decode_step.py --device "$device" "${decode[@]}"
# #7: training step and sampling, ours vs transformers, with MFU, bandwidth floor, peak memory
# and the projection of a 40-generation 33M run
step throughput 330 "$python" bench/throughput.py --device "$device" "${throughput[@]}"
# #7: whether sample.cuda_graphs works and pays: the 33M sampling race with our slots also
# replaying CUDA graphs (a step of its own: a failed replay must not cost the figures above)
step sample-graphs 150 "$python" bench/throughput.py --device "$device" --cuda-graphs \
    "${graphs[@]}"
# #8: one paper-scale fine-tuning pass of the 8 tasks, projected from step times
step downstream 150 "$python" bench/downstream.py --device "$device" "${downstream[@]}"
# whether train.compile pays (#7's MFU may need it): the 33M training step compiled (trunk and
# the loss's per-chunk elementwise work, inductor) beside eager; compile time is spent in the
# untimed warm-up
step compile 200 "$python" bench/throughput.py --device "$device" --compile "${compile[@]}"
# #7 item 4: is deterministic GPU training bitwise repeatable, and at what cost
step determinism 150 "$python" bench/determinism.py --device "$device" "${determinism[@]}"
# every stage of a small run on the device, reference and fast path, timed per stage
step run 240 "$python" bench/gpu_run.py --device "$device" "${run[@]}"
# what sample.precision auto (bf16) buys: the 33M sampling race again in exact fp32 (last: the
# steps above matter more if time runs short)
step sample-fp32 150 "$python" bench/throughput.py --device "$device" --sample-precision fp32 \
    "${fp32[@]}"
echo "done: $out" | tee -a "$log"
