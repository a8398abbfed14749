#!/usr/bin/env bash
# Cloud TPU VM pod launcher: copies this checkout to every worker, installs it, and runs the same
# coerase command on all of them at once (JAX reads the pod's coordinator, process count and id
# itself; COERASE_MULTIHOST=auto tells coerase to ask it).
#   launch/tpu_pod.sh my-v4-32 us-central2-b erase --config configs/sd15.py:nudity \
#       --config.model.source=/mnt/disks/sd15 --run-dir gs-fuse/runs/nudity \
#       --config.mesh.data=4 --config.mesh.fsdp=4 --config.erase.batch_size=16
# Needs: gcloud, the model folder and the run directory on storage every worker sees.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE COERASE_ARGS..." >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
cd "$(dirname "$0")/.."
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }
ssh_all "mkdir -p ~/coerase-jax"
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  pyproject.toml README.md coerase_jax configs launch "$tpu:~/coerase-jax/"
ssh_all "cd ~/coerase-jax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
ssh_all "cd ~/coerase-jax && COERASE_MULTIHOST=auto .venv/bin/coerase $(printf '%q ' "$@")"
