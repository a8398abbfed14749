"""One accelerator check: everything a short loan of a GPU or TPU should measure, in one run.

    python benchmarks/device_check.py --out out/device_check                  # SD 1.5 shapes, <= 8 min
    python benchmarks/device_check.py --shapes tiny --budget-s 120 --out DIR   # the same rows on a CPU

Rows (the SD 1.5 Co-Erasing image step of ``configs/bench_sd15.py``, full UNet, random weights):
batch 1 with each attention kernel the backend has (xla; cudnn on NVIDIA GPUs; chunked), the
paper's sampler (the trainee samples z_t) and ``erase.zt_sampler=teacher``, the largest batch whose
compiled footprint fits the device (found compile-only), and K = 8 concepts side by side (``esd-x``,
one program) against the same step for one concept, whose time x 8 is "one after another". The
first row also times the sampler (images/s). Rows run in order until ``--budget-s`` is spent; a
row that fails (out of memory, a kernel the backend lacks) is recorded with its error.

Writes ``device_check.json`` (every row's ``coerase bench`` result) and ``device_check.md`` (one
table, ready for docs/benchmarks.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax

from coerase_jax.benchmark import run_bench
from coerase_jax.compile_cache import enable as enable_compile_cache
from coerase_jax.configuration import load_config

GIB = 1024 ** 3
SIDE_BY_SIDE = 8


def rows_to_run(backend: str) -> list[tuple[str, str, list[str]]]:
    """(key for --only, row name, config overrides) of every row, in the order they run."""
    kernels = ["xla"] + (["cudnn"] if backend == "gpu" else []) + ["chunked"]
    rows = [(k, f"batch 1, attention {k}", [f"--config.model.attention_impl={k}"]) for k in kernels]
    rows.append(("teacher", "batch 1, zt_sampler=teacher", ["--config.erase.zt_sampler=teacher"]))
    rows.append(("largest", "largest batch", ["largest"]))
    rows.append(("one", "esd-x, 1 concept", ["--config.image_stage.subset=esd-x"]))
    rows.append(("side", f"esd-x, {SIDE_BY_SIDE} concepts side by side",
                 ["--config.image_stage.subset=esd-x", f"--config.bench.concepts={SIDE_BY_SIDE}"]))
    return rows


def largest_batch(base: list[str], limit_bytes: int | None, start: int = 2, most: int = 64) -> int | None:
    """The largest power-of-two batch whose compiled footprint fits in 90 % of the device (compile only)."""
    if not limit_bytes:
        return None
    best, batch = None, start
    while batch <= most:
        config = load_config("configs/bench_sd15.py", base + [f"--config.erase.batch_size={batch}",
                                                               "--config.bench.sampler=false"])
        try:
            footprint = run_bench(config, compile_only=True)["peak_memory_bytes"]
        except Exception:  # (a batch that cannot even compile does not fit)
            break
        if footprint is None or footprint > 0.9 * limit_bytes:
            break
        best, batch = batch, batch * 2
    return best


def markdown(rows: list[dict]) -> str:
    lines = ["| row | batch | step s (median) | iterations/s | examples/s | MFU | peak memory GiB | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row.get("result")
        if r is None:
            lines.append(f"| {row['name']} | | | | | | | {row.get('error', 'skipped')} |")
            continue
        examples = r["batch_size"] * r.get("concepts", 1) * (r["iters_per_s"] or 0)
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
        lines.append(f"| {row['name']} | {r['batch_size']} | {fmt(r['step_s_median'], '.4f')} | "
                     f"{fmt(r['iters_per_s'], '.3g')} | {examples:.3g} | "
                     f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'' if r['mfu'] is None else ' %'} | "
                     f"{fmt(None if r['peak_memory_bytes'] is None else r['peak_memory_bytes'] / GIB, '.2f')} | "
                     f"{r['compile_s']:.1f} |")
    sampler = next((row["result"] for row in rows if row.get("result") and row["result"]["images_per_s"]), None)
    if sampler:
        lines.append(f"\nSampler: {sampler['images_per_s']:.3g} images/s ({sampler['sampler_steps']}-step DDIM + CFG, "
                     f"batch {sampler['sampler_batch']}, UNet only).")
    one = next((row["result"] for row in rows if row["name"] == "esd-x, 1 concept" and row.get("result")), None)
    many = next((row["result"] for row in rows if "side by side" in row["name"] and row.get("result")), None)
    if one and many and one["step_s_median"] and many["step_s_median"]:
        lines.append(f"K = {SIDE_BY_SIDE} concepts side by side: {many['step_s_median']:.4f} s per step for all "
                     f"{SIDE_BY_SIDE}, vs {SIDE_BY_SIDE} x {one['step_s_median']:.4f} s one after another: "
                     f"{SIDE_BY_SIDE * one['step_s_median'] / many['step_s_median']:.2f}x the concepts per hour.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="sd15", help="sd15 (default) or tiny (a CPU rehearsal)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting rows after this long")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per row")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--only", default="", help="rows to run, by key: xla,cudnn,chunked,teacher,largest,one,side "
                                                    "(default: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    enable_compile_cache()
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    backend = device.platform
    base = [f"--config.bench.shapes={args.shapes}", "--config.mesh.data=1", f"--config.bench.steps={args.steps}",
            "--config.bench.warmup=2", f"--config.erase.ddim_steps={args.ddim_steps}"]
    if args.shapes != "sd15":
        base += ["--config.model.dtype=float32", "--config.erase.teacher_dtype=float32", "--config.sample.steps=5"]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    rows = []
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    chosen = [(name, extra) for key, name, extra in rows_to_run(backend) if not wanted or key in wanted]
    for index, (name, extra) in enumerate(chosen):
        row = {"name": name}
        rows.append(row)
        if time.perf_counter() - started > args.budget_s:
            row["error"] = "skipped (time budget spent)"
            continue
        overrides = base + [e for e in extra if e != "largest"] + \
            ([] if index == 0 else ["--config.bench.sampler=false"])
        if "largest" in extra:
            batch = largest_batch(base, limit)
            if batch is None:
                row["error"] = "skipped (the backend reports no memory limit)" if not limit else "batch 2 does not fit"
                continue
            overrides.append(f"--config.erase.batch_size={batch}")
        try:
            row["result"] = run_bench(load_config("configs/bench_sd15.py", overrides))
        except Exception as err:  # recorded, and the check goes on
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            row["traceback"] = traceback.format_exc()[-2000:]
        print(f"[{time.perf_counter() - started:.0f}s] {name}: "
              f"{row['result']['step_s_median']:.4f} s/step" if "result" in row else f"{name}: {row['error']}",
              flush=True)
    header = (f"{device.device_kind} ({backend}, {jax.device_count()} device(s) seen, 1 used), jax {jax.__version__}, "
              f"shapes {args.shapes}, N = {args.ddim_steps}, {args.steps} timed iterations per row, "
              f"{time.perf_counter() - started:.0f} s in all\n\n")
    table = header + markdown(rows)
    (out / "device_check.json").write_text(json.dumps({"device_kind": device.device_kind, "backend": backend,
                                                       "rows": rows}, indent=2, default=str))
    (out / "device_check.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
