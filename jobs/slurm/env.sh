# Environment of squall's Slurm jobs, sourced by jobs/slurm/*.sbatch on every node's batch step.
# Set these in your shell before sbatch (sbatch exports them), or edit the defaults here:
#   SQUALL_MODULES  modules to load, e.g. "cuda/12.4 nccl/2.21"   [none]
#   SQUALL_VENV     the virtual environment to activate            [$SLURM_SUBMIT_DIR/.venv]
#   SQUALL_CACHE    graphs, datasets, local MLflow store           [$SLURM_SUBMIT_DIR/.cache/squall]
#   MLFLOW_TRACKING_URI  a tracking server reachable from the compute nodes [the local store]
# Every wrapper works in $SQUALL_CACHE/slurm/<job>/$SLURM_JOB_ID: a requeued job (same id) finds
# its checkpoint there and continues from it (jobs.train also in the same MLflow run).
if [ -n "${SQUALL_MODULES:-}" ]; then
    module purge
    # shellcheck disable=SC2086  # a list of module names
    module load $SQUALL_MODULES
fi
# shellcheck disable=SC1091
source "${SQUALL_VENV:-$SLURM_SUBMIT_DIR/.venv}/bin/activate"
export SQUALL_CACHE=${SQUALL_CACHE:-$SLURM_SUBMIT_DIR/.cache/squall}
# One thread per CPU Slurm gave each task: the data loader workers are separate processes.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# Compute nodes may see a copy of the code without .git: record the revision submitted.
SQUALL_GIT_SHA=${SQUALL_GIT_SHA:-$(git -C "$SLURM_SUBMIT_DIR" rev-parse HEAD 2>/dev/null || true)}
export SQUALL_GIT_SHA
# The log is opened in append mode (#SBATCH --open-mode=append): each start of the job (a requeue
# after preemption or the time limit) adds to it under this line.
echo "squall: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname -s)" \
    "at $(date -u +%Y-%m-%dT%H:%M:%SZ)"

# run_requeueable CMD...: run CMD (an srun) in the background; when Slurm's warning signal reaches
# this batch shell (#SBATCH --signal=B:USR1@...), pass it to the tasks (srun forwards USR1), let
# them checkpoint and stop, then requeue this job: the next start resumes from the checkpoint.
run_requeueable() {
    local requeue=0 rc=0 pid
    trap 'echo "squall: time limit near, checkpointing then requeueing"; requeue=1; kill -USR1 "$pid" 2>/dev/null' USR1
    "$@" &
    pid=$!
    # wait returns early (status > 128) when the trap runs; wait again until srun has ended.
    while true; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1
    if [ "$requeue" -eq 1 ]; then
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
