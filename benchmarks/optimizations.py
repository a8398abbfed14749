"""Each optimisation switch against the plain setting, measured in ONE run on this machine.

    python benchmarks/optimizations.py [--shapes tiny] [--steps 30] [--json out.json]

Prints a markdown table: mean step time, ratio to plain (lower is better), per-example
throughput ratio, and the compiled per-device footprint. On CPU, bf16 is emulated and slower;
the ratios that transfer to accelerators are remat (memory), batching, donation and snapshots.
"""

from __future__ import annotations

import argparse
import json

from coerase_jax.benchmark import run_bench
from coerase_jax.configuration import load_config

VARIANTS = {
    "plain (fp32, no remat, fp32 teacher)": [],
    "bf16 compute": ["--config.model.dtype=bfloat16"],
    "bf16 teacher": ["--config.erase.teacher_dtype=bfloat16"],
    "remat full": ["--config.model.remat=full"],
    "remat dots": ["--config.model.remat=dots"],
    "attention xla": ["--config.model.attention_impl=xla"],
    "batch x4": ["batch4"],
    "no donation": ["--config.bench.donate=false"],
    "snapshots_per_trajectory=4 (departure)": ["--config.erase.snapshots_per_trajectory=4"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    base = ["--config.erase.stages=image", "--config.erase.batch_size=1", "--config.mesh.data=1",
            f"--config.bench.shapes={args.shapes}", f"--config.bench.steps={args.steps}", "--config.bench.warmup=3",
            "--config.erase.ddim_steps=20"]
    results = {}
    for name, extra in VARIANTS.items():
        overrides = base + [e for e in extra if e != "batch4"]
        if "batch4" in extra:
            overrides.append("--config.erase.batch_size=4")
        config = load_config("configs/tiny.py", overrides)
        results[name] = run_bench(config)
        r = results[name]
        print(f"{name}: {r['step_s_mean']:.4f} s/step, footprint {r['peak_memory_bytes'] / 2**20:.1f} MiB", flush=True)
    plain = results[next(iter(VARIANTS))]
    print("\n| setting | step s (mean) | time ratio | examples/s ratio | compiled footprint MiB | memory ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        examples = r["batch_size"] * (4 if "snapshots" in name else 1)
        throughput = (examples / r["step_s_mean"]) / (plain["batch_size"] / plain["step_s_mean"])
        print(f"| {name} | {r['step_s_mean']:.4f} | {r['step_s_mean'] / plain['step_s_mean']:.2f} | "
              f"{throughput:.2f} | {r['peak_memory_bytes'] / 2**20:.1f} | "
              f"{r['peak_memory_bytes'] / plain['peak_memory_bytes']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
