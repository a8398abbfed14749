#!/usr/bin/env bash
# Local launcher: any coerase subcommand on this machine, as one process (default) or as N
# processes joined by jax.distributed — the multi-host code path, rehearsed on one machine.
#   launch/local.sh sample --config configs/tiny.py --prompt "a red circle" --out out/tiny
#   launch/local.sh -n 2 -d 2 erase --config configs/tiny.py --run-dir runs/tiny2   # 2 processes x 2 CPU devices
# With -n N: process 0 is the coordinator (127.0.0.1:$COERASE_PORT, default 12355); -d D gives each
# process D simulated CPU devices. If any process fails, the others are stopped and the job exits
# non-zero; run the same command again to resume from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
processes=1 devices=""
while getopts "n:d:" opt; do
  case $opt in n) processes=$OPTARG ;; d) devices=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
if [ ! -x .venv/bin/coerase ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -e .
fi
if [ -n "$devices" ]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
fi
if [ "$processes" -eq 1 ]; then
  exec .venv/bin/coerase "$@"
fi
export COERASE_COORDINATOR="127.0.0.1:${COERASE_PORT:-12355}" COERASE_NUM_PROCESSES=$processes
pids=()
for ((i = 0; i < processes; i++)); do
  COERASE_PROCESS_ID=$i .venv/bin/coerase "$@" &
  pids+=($!)
done
status=0
for ((i = 0; i < processes; i++)); do  # as each one ends; the first failure stops the rest
  if ! wait -n; then
    status=1
    echo "launch/local.sh: a process failed; stopping the others (rerun the same command to resume)" >&2
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
