"""Foundation measurements (a script, not a test):

1. sampling throughput of the tiny preset (images/s after compilation, median of repeats);
2. compiled memory and FLOPs of the SD 1.5 UNet forward at 64x64 latents, from XLA's
   ``memory_analysis()`` / ``cost_analysis()`` — compiled only, never run, so it works on a laptop.

    python benchmarks/foundation.py [--skip-sd15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.models.bundle import load_bundle
from coerase_jax.models.unet import Precision, UNet, UNetConfig

SD15_UNET = UNetConfig()  # the dataclass defaults are SD 1.x's unet/config.json


def tiny_sampling_throughput(batch: int = 8, steps: int = 25, repeats: int = 5) -> dict:
    bundle = load_bundle("tiny")
    sampler = Sampler(bundle, steps=steps, guidance_scale=3.0, batch_size=batch)
    prompts, seeds = ["a red circle"] * batch, list(range(batch))
    start = time.perf_counter()
    sampler(prompts, seeds, progress=False)
    first = time.perf_counter() - start
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        sampler(prompts, [s + 100 * (r + 1) for s in seeds], progress=False)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"batch": batch, "steps": steps, "first_call_s": round(first, 3), "median_batch_s": round(median, 4),
            "images_per_s": round(batch / median, 2), "device": jax.devices()[0].device_kind}


def sd15_unet_forward_compiled(batch: int, dtype) -> dict:
    unet = UNet(SD15_UNET, precision=Precision(dtype=dtype))
    params = jax.eval_shape(unet.init_params, jax.random.PRNGKey(0))
    if dtype != jnp.float32:
        params = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)
    x = jax.ShapeDtypeStruct((batch, 4, 64, 64), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = jax.ShapeDtypeStruct((batch, 77, 768), jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(params, x, t, text).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    gib = 1024 ** 3
    return {
        "batch": batch, "dtype": jnp.dtype(dtype).name, "params": n_params, "compile_s": round(compile_s, 1),
        "argument_gib": round(mem.argument_size_in_bytes / gib, 3),
        "output_gib": round(mem.output_size_in_bytes / gib, 4),
        "temp_gib": round(mem.temp_size_in_bytes / gib, 3),
        "gflops": round(float(cost.get("flops", 0.0)) / 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"tiny_sampling": tiny_sampling_throughput()}
    print("tiny sampling:", results["tiny_sampling"])
    if not args.skip_sd15:
        results["sd15_unet_forward"] = []
        for batch, dtype in ((1, jnp.float32), (2, jnp.float32), (2, jnp.bfloat16)):
            row = sd15_unet_forward_compiled(batch, dtype)
            results["sd15_unet_forward"].append(row)
            print("SD 1.5 UNet forward, 64x64 latents:", row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
