#!/usr/bin/env bash
# Cold vs warm start of the SD 1.5 bench step (--compile-only, FSDP over 4 simulated CPU devices),
# with XLA:CPU's default fusions and without its YNN fusions; each variant gets a fresh cache folder.
#   bash benchmarks/warm_start.sh      # writes out/sd15_{default,ynnoff}_{cold,warm}.json
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
for variant in default ynnoff; do
  if [ "$variant" = ynnoff ]; then export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=; else unset XLA_FLAGS; fi
  cache=$(mktemp -d)
  for run in cold warm; do
    /usr/bin/time -f "%e s wall" env COERASE_COMPILE_CACHE="$cache" coerase bench --config configs/bench_sd15.py \
      --compile-only --simulate-devices 4 --config.mesh.data=1 --config.mesh.fsdp=4 --config.erase.batch_size=4 \
      --json "out/sd15_${variant}_${run}.json" > "out/sd15_${variant}_${run}.log" 2>&1
    python -c "import json; d = json.load(open('out/sd15_${variant}_${run}.json')); \
print('${variant} ${run}: compile_s', d['compile_s'], '| whole command', open('out/sd15_${variant}_${run}.log').read().split()[-3])"
  done
  rm -rf "$cache"
done
