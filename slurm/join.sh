#!/bin/bash
#SBATCH --job-name=join
# One more node for a running sweep: a Ray worker joins the sweep in OUT and leaves it drained.
#   sbatch slurm/join.sh runs/tune-densenet-4242
#   sbatch --array=1-8 slurm/join.sh runs/tune-densenet-4242     # eight nodes, each as Slurm frees one
#   sbatch -N 4 slurm/join.sh runs/tune-densenet-4242            # four nodes at once (a Ray worker on each)
#   sbatch --gpus-per-node=0 -c 16 slurm/join.sh OUT               # a CPU node
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
# Leaving: two minutes before the time limit (USR1 above), or `scancel --batch --signal=USR1 JOB`, the node is
# drained first: its trials save a checkpoint at their next step and continue elsewhere, without a failure. A
# plain `scancel JOB` stops every process of the job at once: its trials continue from their last checkpoint.
# A join after the sweep has ended says so and exits 0. Environment: PYTHON (default python).
set -euo pipefail
if [ $# -lt 1 ]; then echo "error: no sweep folder given: sbatch slurm/join.sh OUT" >&2; exit 2; fi
exec "${PYTHON:-python}" -m hpc.join "$@"
