# Sourced by launch/stage*.slurm inside the batch script (so its signal trap runs there):
# one torchrun per node, started by srun, running `finevit train`.
#
# Environment (all optional but CONFIG):
#   CONFIG          recipe YAML, e.g. configs/stage1/finevit_0.9b.yaml
#   RUN_DIR         run directory (default runs/<job name>-<job id>; a requeued job keeps its id,
#                   finds its checkpoints there and resumes)
#   GPUS_PER_NODE   processes per node (default: the GPUs SLURM gave the job, else nvidia-smi's
#                   count, else 1; on CPU nodes set it to the ranks you want per node)
#   OVERRIDES       extra dotted overrides, e.g. "optimizer.lr=3e-4 data.num_workers=4"
#                   (arguments after the script name on the sbatch line are appended too)
#   PYTHON          interpreter with finevit installed (default .venv/bin/python)
#   MASTER_ADDR     rendezvous host (default: the job's first node)
#   MASTER_PORT     rendezvous port (default derived from the job id)
#   LOCAL_ADDR      address each node's workers are reached at (torchrun --local-addr; default:
#                   the host name)
# Pre-timeout: --signal=B:USR1@<s> makes the trap below ask the trainer to checkpoint and stop
# (a REQUEUE file in the run directory, read by every rank at the next step), then requeue.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
: "${CONFIG:?set CONFIG to a recipe, e.g. CONFIG=configs/stage1/finevit_0.9b.yaml sbatch ...}"
TASK=${TASK:-}  # empty: the config's `task`
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-finevit}-${SLURM_JOB_ID:-local}}
PYTHON=${PYTHON:-.venv/bin/python}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
  ((GPUS_PER_NODE > 0)) || GPUS_PER_NODE=1
fi
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

# NCCL: fail fast on a hung collective instead of waiting for the job's time limit; megatron's
# TP communication overlap needs one CUDA connection per device queue.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE : 1 ))}

mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/REQUEUE"
echo "finevit ${TASK:-$(basename "$CONFIG")}: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}, $NNODES node(s) x $GPUS_PER_NODE, run dir $RUN_DIR"

requeue_requested=0
on_usr1() {
  echo "finevit: USR1 before the time limit: checkpointing, then requeueing"
  requeue_requested=1
  touch "$RUN_DIR/REQUEUE"
}
trap on_usr1 USR1

# One torchrun per node. The first node hosts the rendezvous store, said explicitly: torchrun
# guesses it from host names, and nodes that share one (containers) would all try to host it.
# shellcheck disable=SC2016  # expanded by the per-node shell, where SLURM_NODEID is set
export PYTHON NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT TASK
export RDZV_ID=${SLURM_JOB_ID:-0} LOCAL_ADDR=${LOCAL_ADDR:-}
# shellcheck disable=SC2086  # OVERRIDES is a list of words
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
  is_host=false; [[ "${SLURM_NODEID:-0}" == 0 ]] && is_host=true
  exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    --rdzv_conf="is_host=$is_host" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} \
    -m finevit.cli train ${TASK:+--task "$TASK"} "$@"' finevit-node "$CONFIG" "logging.run_dir=$RUN_DIR" ${OVERRIDES:-} "$@" &
step=$!
status=0
# `wait` returns early when the trap runs; keep waiting until the step itself has ended.
while kill -0 "$step" 2>/dev/null; do
  wait "$step" && status=0 || status=$?
done
rm -f "$RUN_DIR/REQUEUE"
if ((requeue_requested)) && ((status == 0)); then
  echo "finevit: checkpoint written; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
