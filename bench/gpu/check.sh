#!/usr/bin/env bash
# The GPU checks of finevit in one device call (see bench/gpu/fetch_wheels.sh first; RESULTS.md
# says what they measure). Each step has its own time limit and log under $OUT, and a failing
# step does not stop the next: the summary at the end says which passed.
#   device run: carry [".whl"], timeout_s 600, command "bash bench/gpu/check.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/finevit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests" TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "wheel install failed"; exit 1; }
summary=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -25 "$OUT/$name.log"
    summary+=("$name rc=$rc $((SECONDS - t0))s")
}
step doctor 60 python3 -m finevit.cli doctor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# Encoder throughput (packed vs padded, TFLOP/s, MFU) and the stage-1 step of finevit-0.9b at 448^2.
step encoder 150 python3 bench/encoder.py --preset finevit-0.9b --json "$OUT/encoder.json"
step stage1_step 150 python3 bench/stage1_step.py --preset finevit-0.9b --steps 10
# bf16 stage 1 end to end on the demo corpus (NCCL, one GPU): trains, checkpoints, resumes, evaluates.
python3 data_tools/make_demo_corpus.py --out /tmp/demo --train 600 --heldout 100 \
    --schemas recaption classify --quiet > "$OUT/corpus.log" 2>&1
python3 data_tools/train_tokenizer.py /tmp/demo/recaption/train --vocab-size 512 \
    --out /tmp/demo/caption.model --quiet >> "$OUT/corpus.log" 2>&1
train=(python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m finevit.cli train
       configs/stage1/demo_cpu.yaml parallel.tensor=1 parallel.backend=nccl precision.dtype=bf16
       logging.run_dir=/tmp/run schedule.train_samples=3000 schedule.warmup_samples=200
       "schedule.phases=[{start_samples: 0, max_pixels: 12544, max_text_len: 64}, {start_samples: 2000, max_pixels: 25088, max_text_len: 96}]"
       "data.corpora=[{path: /tmp/demo/recaption/train}]" data.tokenizer=/tmp/demo/caption.model
       "eval.corpora=[{path: /tmp/demo/recaption/heldout}, {path: /tmp/demo/classify/heldout, name: shapes}]")
step train_bf16_part1 120 "${train[@]}" schedule.stop_after_steps=40
step train_bf16_resume 150 "${train[@]}"
cp /tmp/run/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
python3 -m finevit.cli report /tmp/run > "$OUT/report.txt" 2>&1; cat "$OUT/report.txt"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
