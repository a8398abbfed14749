#!/usr/bin/env bash
# SLURM launcher for multi-node GPUs: one coerase process per node, all of its GPUs, process 0 on
# the first node is the coordinator.
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh erase --config configs/sd15.py:nudity \
#       --config.model.source=/data/sd15 --run-dir /shared/runs/nudity --config.erase.batch_size=16
# Needs: the project installed in .venv on a filesystem every node sees (the run directory too).
# --kill-on-bad-exit stops every task when one dies; sbatch the same command again to resume.
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=coerase
#SBATCH --output=coerase-%j.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export COERASE_COORDINATOR="$first_node:${COERASE_PORT:-12355}" COERASE_NUM_PROCESSES=$SLURM_NNODES
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'COERASE_PROCESS_ID=$SLURM_PROCID exec .venv/bin/coerase "$@"' coerase "$@"
