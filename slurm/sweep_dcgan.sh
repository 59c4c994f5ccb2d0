#!/bin/bash
#SBATCH --job-name=sweep-dcgan
# Ray Tune + Optuna sweep of DCGANs, objective FID against the validation split.
#   sbatch --nodes=4 --gpus-per-node=4 slurm/sweep_dcgan.sh
#   sbatch --gpus-per-node=0 slurm/sweep_dcgan.sh                     # CPU-only cluster
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# One Ray node per Slurm node (python -m hpc.ray_cluster), token auth, dashboard URL in the log.
# SIGUSR1 three minutes before the time limit requeues the job; a requeued job (scontrol requeue,
# preemption, the time limit) continues the same run from OUT.
# Environment: DATA_DIR (folder of cifar-100-python/, default data), SYNTHETIC=1 (procedural data),
# WORKER_JOBS=N (submit N join jobs, cancelled when the sweep ends), DRIVER_ONLY=1 (this job runs the driver only),
# OUT (default runs/<job name>-<job id>), PYTHON (default python), SWEEP (default sweeps/dcgan.toml), GPUS_PER_TRIAL (default auto); more flags after the script name.
set -euo pipefail
PY=${PYTHON:-python}
data=(--data-dir "${DATA_DIR:-data}")
if [ -n "${SYNTHETIC:-}" ]; then data=(--synthetic); fi
out=${OUT:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
echo "[cifarray] out $out; to continue this sweep in a later job: ${SYNTHETIC:+SYNTHETIC=1 }${DATA_DIR:+DATA_DIR=$DATA_DIR }OUT=$out sbatch slurm/sweep_dcgan.sh $*"
echo "[cifarray] watch the study: optuna-dashboard $(realpath -m "$out")/optuna.journal (pip install 'cifarray[dashboard]')"
echo "[cifarray] more nodes for this sweep: sbatch --array=1-4 slurm/join.sh $out"
head=()
if [ -n "${DRIVER_ONLY:-}" ]; then head+=(--driver-only); fi
if [ -n "${WORKER_JOBS:-}" ]; then head+=(--worker-jobs "$WORKER_JOBS"); fi
exec "$PY" -m hpc.ray_cluster "${head[@]}" -- "$PY" -m cifarray.tune --sweep "${SWEEP:-sweeps/dcgan.toml}" --resume=auto \
    --gpus-per-trial "${GPUS_PER_TRIAL:-auto}" "${data[@]}" \
    --out "$out" "$@"
