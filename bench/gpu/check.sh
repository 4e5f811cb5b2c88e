#!/usr/bin/env bash
# The GPU checks of finevit in one device call (see bench/gpu/fetch_wheels.sh first; RESULTS.md
# says what they measure). Each step has its own time limit, and a failing step does not stop the
# next: the summary at the end says which passed. Back under $OUT (the device returns at most 8
# files): log.txt (every step's output), encoder.json, metrics.jsonl, summary.txt.
#   device run: carry [".whl"], timeout_s 600, command "bash bench/gpu/check.sh"
# The steps' limits add up to 560 s. SKIP="encoder stage1_step" leaves steps out (a rerun);
# BACKEND=gloo DTYPE=fp32 runs the training steps on a CPU machine (to try the script itself).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/finevit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests" TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "wheel install failed"; exit 1; }
summary=()
LOG=$OUT/log.txt
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    if [[ " ${SKIP:-} " == *" $name "* ]]; then summary+=("$name skipped"); return; fi
    echo "=== $name: $*" >> "$LOG"
    timeout "$limit" "$@" > /tmp/step.log 2>&1
    local rc=$?
    cat /tmp/step.log >> "$LOG"
    echo "=== $name"; tail -25 /tmp/step.log
    summary+=("$name rc=$rc $((SECONDS - t0))s")
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
step doctor 40 python3 -m finevit.cli doctor
# Encoder throughput (packed vs padded, TFLOP/s, MFU) and the stage-1 step of finevit-0.9b at 448^2.
step encoder 110 python3 bench/encoder.py --preset finevit-0.9b --json "$OUT/encoder.json"
step stage1_step 110 python3 bench/stage1_step.py --preset finevit-0.9b --steps 10
# bf16 stage 1 end to end on the demo corpus (NCCL, one GPU): trains, checkpoints, resumes, evaluates.
step corpus 40 python3 data_tools/make_demo_corpus.py --out /tmp/demo --train 600 --heldout 100 \
    --schemas recaption classify --quiet
step tokenizer 30 python3 data_tools/train_tokenizer.py /tmp/demo/recaption/train --vocab-size 512 \
    --out /tmp/demo/caption.model --quiet
train=(python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m finevit.cli train
       configs/stage1/demo_cpu.yaml parallel.tensor=1 parallel.backend=${BACKEND:-nccl} precision.dtype=${DTYPE:-bf16}
       logging.run_dir=/tmp/run schedule.train_samples=3000 schedule.warmup_samples=200
       "schedule.phases=[{start_samples: 0, max_pixels: 12544, max_text_len: 64}, {start_samples: 2000, max_pixels: 25088, max_text_len: 96}]"
       "data.corpora=[{path: /tmp/demo/recaption/train}]" data.tokenizer=/tmp/demo/caption.model
       "eval.corpora=[{path: /tmp/demo/recaption/heldout}, {path: /tmp/demo/classify/heldout, name: shapes}]")
step train_bf16_part1 90 "${train[@]}" schedule.stop_after_steps=40
step train_bf16_resume 120 "${train[@]}"
cp /tmp/run/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
step report 20 python3 -m finevit.cli report /tmp/run
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
