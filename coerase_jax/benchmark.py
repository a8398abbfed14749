"""``coerase bench``: compile and time the erasure step and the sampler on any accelerator.

What it reports (JSON schema, all keys always present; ``null`` where a backend cannot say):

    device_kind, num_devices, mesh            what ran, and how it was laid out
    shapes, batch_size, ddim_steps, settings  what was measured
    concepts                                  K > 1: K concepts side by side in one program (each
                                              its own trainable part and batch; FLOPs and iters
                                              count all K)
    stage, subset, lora_rank                  what trains (lora_rank 0: the subset's own weights)
    compile_s                                 AOT compile of the erasure step
    step_s_median, step_s_mean                per iteration, after warm-up (null with --compile-only)
    iters_per_s                               1 / step_s_mean (throughput; the DDIM index is random)
    images_per_s                              sampler: images per second, N-step DDIM + CFG, UNet only
    sampler_compile_s                         (both null with bench.sampler off)
    flops_per_iter                            expected FLOPs of one iteration (see below)
    flops_zt_eval                             FLOPs of one z_t denoising evaluation (loop body)
    achieved_flops_per_s, mfu                 flops_per_iter / step_s_mean, and that over the peak
                                              bf16 dense FLOP/s of all devices (null on CPU/unknown)
    peak_memory_bytes                         device memory stats where the backend has them, else
                                              the compiled program's per-device footprint
    compiled_memory                           memory_analysis(): argument/output/temp/alias bytes

FLOPs: XLA's cost analysis counts a while-loop body once, and the z_t loop runs a random number
of times (i ~ U{0..N-1}, mean (N-1)/2). So flops_per_iter = cost(step) + ((N-1)/2 - 1) * cost(one
z_t denoising evaluation), each from ``compiled.cost_analysis()``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coerase_jax import compile_cache
from coerase_jax.diffusion.sampling import Conditioning, denoise, guided_eps
from coerase_jax.erase.batched import batched_step, concept_batch_sharding, concept_sharding, jit_batched_step
from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase.step import Batch, TrainState, build_step, denoiser, jit_step
from coerase_jax.erase.trainer import optimizer_for, plan_stages, program_config, zt_plan
from coerase_jax.errors import UserError
from coerase_jax.models.bundle import DTYPES, precision_from_config
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models import presets
from coerase_jax.models.presets import SD21_UNET, SD_SCHEDULER, SDXL_UNET, TINY_UNET
from coerase_jax.models.unet import UNet, UNetConfig
from coerase_jax.parallel import mesh as mesh_lib

# Dense bf16 peak, TFLOP/s per chip, by a substring of jax's device_kind (first match wins).
PEAK_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
    ("v4", 275.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
)


def peak_flops(device_kind: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12
    return None


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Everything the step's shapes depend on; no weights needed."""

    name: str
    unet: UNetConfig
    text_len: int = 77
    embed_dim: int = 1024
    prediction_type: str = "epsilon"  # v_prediction for SD 2.x (the sampler's arithmetic only)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.unet.in_channels, self.unet.sample_size, self.unet.sample_size)

    @property
    def scheduler(self) -> dict:
        return {**SD_SCHEDULER, "prediction_type": self.prediction_type}


SHAPES = {
    "tiny": Shapes("tiny", TINY_UNET, 77, 32),
    "sd15": Shapes("sd15", UNetConfig(), 77, 1024),  # SD 1.x UNet at 512x512 (64x64 latents)
    "sd21": Shapes("sd21", SD21_UNET, 77, 1024, "v_prediction"),  # SD 2.1 at 768x768 (96x96 latents)
    # SDXL at 1024x1024 (128x128 latents), IP-Adapter SDXL ViT-H (1024-d image embeddings)
    "sdxl": Shapes("sdxl", SDXL_UNET, 77, 1024),
}


def shapes_from_config(config) -> Shapes:
    name = config.bench.shapes or config.model.source
    if name in SHAPES:
        return SHAPES[name]
    root = presets.source_folder(name)  # a model folder, or a random-weight preset's (tiny-sd2, tiny-sdxl)
    unet_json = root / "unet" / "config.json"
    if not unet_json.is_file():
        raise UserError(f"bench.shapes must be one of {sorted(SHAPES)} or a model folder with unet/config.json")
    unet = UNetConfig.from_diffusers(json.loads(unet_json.read_text()))
    encoder_json = root / "image_encoder" / "config.json"
    embed = json.loads(encoder_json.read_text()).get("projection_dim", 1024) if encoder_json.is_file() else 1024
    scheduler_json = root / "scheduler" / "scheduler_config.json"
    prediction = json.loads(scheduler_json.read_text()).get("prediction_type") if scheduler_json.is_file() else None
    return Shapes(str(root), unet, 77, int(embed), prediction or "epsilon")


def _cost_flops(lowered_or_compiled) -> float:
    cost = lowered_or_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def _memory(compiled) -> dict[str, int] | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(mem, f, 0)) for f in fields}


def _footprint(memory: dict[str, int] | None) -> int | None:
    """Per-device bytes the compiled program needs at once: arguments + outputs + temporaries,
    less what donation lets outputs reuse."""
    if memory is None:
        return None
    return (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] + memory["temp_size_in_bytes"]
            - memory["alias_size_in_bytes"])


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def run_bench(config, compile_only: bool = False) -> dict[str, Any]:
    shapes = shapes_from_config(config)
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    stage = plan_stages(config)[-1]
    settings = stage.settings
    precision = precision_from_config(config.model)
    unet = UNet(shapes.unet, with_image_kv=True, precision=precision)
    proj = ImageProjection(shapes.unet.cross_attention_dim, 4)
    optimizer = optimizer_for(config, stage)
    plan = zt_plan(shapes.scheduler, config)
    batch_size = config.erase.batch_size
    mesh_lib.batch_size_per_replica_check(batch_size, mesh)
    teacher_dtype = DTYPES[config.erase.teacher_dtype]

    params = jax.eval_shape(unet.init_params, jax.random.PRNGKey(0))
    trainable, frozen = jax.eval_shape(stage.trainable.split, params)  # the subset's weights, or a LoRA of them
    teacher = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, teacher_dtype), params)
    proj_params = jax.eval_shape(lambda r: proj.init_params(r, shapes.embed_dim), jax.random.PRNGKey(0))
    init_state = lambda t: TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t))
    state = jax.eval_shape(init_state, trainable)
    d = shapes.unet.cross_attention_dim
    f32 = jnp.float32
    added = _added_shape(shapes, batch_size)  # SDXL's pooled text + time ids; None otherwise
    batch = Batch(jax.ShapeDtypeStruct((batch_size, shapes.text_len, d), f32),
                  jax.ShapeDtypeStruct((batch_size, shapes.text_len, d), f32),
                  jax.ShapeDtypeStruct((batch_size, shapes.text_len, d), f32),
                  jax.ShapeDtypeStruct((batch_size, shapes.text_len), jnp.bool_),
                  jax.ShapeDtypeStruct((batch_size, shapes.embed_dim), f32) if settings.use_image else None,
                  added, added,
                  # the kept prompts of a preservation term (erase.preserve_weight > 0)
                  *((jax.ShapeDtypeStruct((batch_size, shapes.text_len, d), f32), added)
                    if settings.preserve_weight > 0 else ()))

    concepts = config.bench.concepts
    if concepts > 1:  # K concepts side by side: each its own trainable part, optimizer state and batch
        stacked = lambda tree: jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((concepts,) + a.shape, a.dtype), tree)
        state, batch = stacked(state), stacked(batch)
    sh = lambda tree: mesh_lib.tree_shardings(tree, mesh)
    on_concepts = lambda tree: jax.tree_util.tree_map(lambda leaf: concept_sharding(mesh, leaf.ndim), tree)
    state_sh = on_concepts(state) if concepts > 1 else sh(state)
    batch_sh = jax.tree_util.tree_map(
        lambda leaf: concept_batch_sharding(mesh, leaf.ndim) if concepts > 1 else mesh_lib.batch_sharding(mesh), batch)
    args = (_abstract(state, state_sh), _abstract(frozen, sh(frozen)), _abstract(teacher, sh(teacher)),
            _abstract(proj_params, sh(proj_params)), _abstract(batch, batch_sh))

    def jit_for(unet_def):
        if concepts > 1:
            step_fn = build_step(unet_def, proj, plan, settings, optimizer, shapes.latent_shape, None,
                                 compose=stage.trainable.compose)
            return jit_batched_step(batched_step(step_fn), mesh, state, frozen, teacher, proj_params, batch,
                                    donate=config.bench.donate)
        step_fn = build_step(unet_def, proj, plan, settings, optimizer, shapes.latent_shape, mesh,
                             compose=stage.trainable.compose)
        return jit_step(step_fn, mesh, state, frozen, teacher, proj_params, batch, donate=config.bench.donate)

    made_of = (program_config(config), config.bench, shapes, stage, plan)  # what the programs' closures read
    start = time.perf_counter()
    compiled, _ = compile_cache.compile_program(jit_for(unet), args, made_of, "bench-step")
    compile_s = time.perf_counter() - start
    memory = _memory(compiled)

    def count_flops() -> dict:
        # FLOPs from the lowered programs (no compile needed) with plain XLA attention: the cost
        # analysis counts a loop body once, which would hide chunked attention's blocks too.
        flops_unet = UNet(shapes.unet, with_image_kv=True,
                          precision=dataclasses.replace(precision, attention_impl="xla"))
        eps = denoiser(flops_unet)
        sampler_params = _abstract(params, sh(params))
        cond = Conditioning(jax.ShapeDtypeStruct((batch_size, shapes.text_len, d), f32), None, added)
        uncond = cond if settings.zt_guidance != 1.0 else None
        x = jax.ShapeDtypeStruct((batch_size,) + shapes.latent_shape, f32)
        t = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        body = jax.jit(lambda p, x, t, c, u: guided_eps(eps, p, x, t, c, u, settings.zt_guidance))
        body_flops = _cost_flops(body.lower(sampler_params, x, t, cond, uncond)) * concepts
        expected_loop = (plan.num_steps - 1) / 2
        step_flops = _cost_flops(jit_for(flops_unet).lower(*args))
        return {"per_iter": step_flops + (expected_loop - 1) * body_flops, "zt_eval": body_flops}

    flops = compile_cache.remembered("bench-flops", (made_of, args), count_flops)
    flops_per_iter, body_flops = flops["per_iter"], flops["zt_eval"]
    eps = denoiser(unet)

    concrete = None
    if not compile_only:
        concrete = _materialise(unet, proj, shapes, params, teacher_dtype, init_state, mesh, config, stage)
        if concepts > 1:
            concrete = (jax.device_put(jax.tree_util.tree_map(lambda a: jnp.stack([a] * concepts), concrete[0]),
                                       state_sh),) + concrete[1:]
    sampler = {"sampler_compile_s": None, "sampler_batch": None, "sampler_steps": None, "images_per_s": None}
    if config.bench.sampler:
        sample_plan = NoiseSchedule.from_config(shapes.scheduler).ddim_plan(config.sample.steps)
        sampler = _sampler_bench(eps, sample_plan, params, shapes, mesh, config,
                                 None if concrete is None else concrete[4], made_of=(made_of, config.sample))

    result = {
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": mesh.size,
        "mesh": dict(mesh.shape),
        "shapes": shapes.name,
        "batch_size": batch_size,
        "concepts": concepts,
        "ddim_steps": plan.num_steps,
        "stage": stage.name,
        "subset": stage.subset,
        "lora_rank": stage.trainable.lora_rank,  # 0: the subset's weights are trained
        "settings": {"dtype": config.model.dtype, "teacher_dtype": config.erase.teacher_dtype,
                     "remat": config.model.remat, "attention_impl": config.model.attention_impl or "default",
                     "donate": config.bench.donate, "zt_sampler": config.erase.zt_sampler,
                     "first_moment_dtype": config.optim.first_moment_dtype},
        "compile_s": round(compile_s, 2),
        "step_s_median": None,
        "step_s_mean": None,
        "iters_per_s": None,
        "flops_per_iter": flops_per_iter,
        "flops_zt_eval": body_flops,
        "achieved_flops_per_s": None,
        "mfu": None,
        "peak_memory_bytes": _footprint(memory),
        "peak_memory_source": "compiled memory_analysis (per device)",
        "compiled_memory": memory,
        **sampler,
    }
    if compile_only:
        return result

    state_c, frozen_c, teacher_c, proj_c, _ = concrete
    rng = np.random.default_rng(0)
    host_batch = Batch(*(None if a is None else
                         (rng.standard_normal(a.shape).astype(np.float32) if a.dtype == f32 else np.ones(a.shape, bool))
                         for a in batch))
    from coerase_jax.erase.trainer import put_batch

    device_batch = (jax.device_put(host_batch, batch_sh) if concepts > 1 else put_batch(host_batch, mesh))
    times = []
    for i in range(config.bench.warmup + config.bench.steps):
        start = time.perf_counter()
        state_c, metrics = compiled(state_c, frozen_c, teacher_c, proj_c, device_batch)
        jax.block_until_ready((state_c, metrics))
        if i >= config.bench.warmup:
            times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    achieved = flops_per_iter / mean
    peak = peak_flops(result["device_kind"])
    stats = jax.devices()[0].memory_stats() or {}
    result.update({
        "step_s_median": statistics.median(times),
        "step_s_mean": mean,
        "iters_per_s": 1.0 / mean,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / (peak * mesh.size) if peak else None,
    })
    if "peak_bytes_in_use" in stats:
        result["peak_memory_bytes"] = int(stats["peak_bytes_in_use"])
        result["peak_memory_source"] = "device memory_stats peak_bytes_in_use"
    return result


def _added_shape(shapes: Shapes, batch: int) -> jax.ShapeDtypeStruct | None:
    """SDXL's added conditioning (pooled text + time ids) for ``batch`` examples; None without text_time."""
    width = shapes.unet.added_cond_dim
    return jax.ShapeDtypeStruct((batch, width), jnp.float32) if width else None


def _materialise(unet, proj, shapes, params, teacher_dtype, init_state, mesh, config, stage):
    """Random weights, created on the devices with their final shardings (no host copy of SD)."""
    sh = lambda tree: mesh_lib.tree_shardings(tree, mesh)
    full = jax.jit(unet.init_params, out_shardings=sh(params))(jax.random.PRNGKey(0))
    train, froz = jax.jit(stage.trainable.split, out_shardings=sh(jax.eval_shape(stage.trainable.split, params)))(full)
    state = jax.jit(init_state, out_shardings=sh(jax.eval_shape(init_state, train)))(train)
    teacher = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x.astype(teacher_dtype), p),
                      out_shardings=sh(params))(full)
    proj_params = jax.jit(lambda r: proj.init_params(r, shapes.embed_dim))(jax.random.PRNGKey(1))
    return state, froz, teacher, jax.device_put(proj_params, sh(proj_params)), full


def _sampler_bench(eps, plan, params, shapes: Shapes, mesh, config, concrete_params=None, made_of=()) -> dict:
    """The N-step DDIM + CFG loop of the UNet at the sampling batch size (text encode / VAE excluded).

    Compiled always; timed when ``concrete_params`` are given."""
    batch = config.sample.batch_size
    guidance = config.sample.guidance_scale
    d = shapes.unet.cross_attention_dim
    sh = mesh_lib.tree_shardings(params, mesh)
    data = mesh_lib.batch_sharding(mesh)
    run = jax.jit(lambda p, x, c, u: denoise(eps, p, x, plan, c, u, guidance),
                  in_shardings=(sh, data, data, data), out_shardings=data)
    f32 = jnp.float32
    shape_x, shape_c = (batch,) + shapes.latent_shape, (batch, shapes.text_len, d)
    on_data = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data)
    cond = Conditioning(on_data(jax.ShapeDtypeStruct(shape_c, f32)), None, on_data(_added_shape(shapes, batch)))
    args = (_abstract(params, sh), jax.ShapeDtypeStruct(shape_x, f32, sharding=data), cond, cond)
    start = time.perf_counter()
    compiled, _ = compile_cache.compile_program(run, args, (made_of, plan), "bench-sampler")
    out = {"sampler_compile_s": round(time.perf_counter() - start, 2), "sampler_batch": batch,
           "sampler_steps": plan.num_steps, "images_per_s": None}
    if concrete_params is None:
        return out
    rng = np.random.default_rng(0)
    x, c, u = (jax.device_put(jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32), shape),
                              data) for shape in (jax.ShapeDtypeStruct(shape_x, f32), cond, cond))
    jax.block_until_ready(compiled(concrete_params, x, c, u))  # warm-up
    times = []
    for _ in range(max(2, config.bench.steps // 4)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(concrete_params, x, c, u))
        times.append(time.perf_counter() - start)
    out["images_per_s"] = batch / statistics.median(times)
    return out


def format_table(result: dict) -> str:
    def fmt(value, unit=""):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}{unit}"
        return f"{value}{unit}"

    gib = 1024 ** 3
    rows = [
        ("device", f"{result['device_kind']} x{result['num_devices']} mesh {result['mesh']}"),
        ("shapes / batch", f"{result['shapes']} / {result['batch_size']}"
                           + (f" x {result['concepts']} concepts side by side" if result.get("concepts", 1) > 1 else "")
                           + f" (DDIM N={result['ddim_steps']}, "
                           f"stage {result['stage']}, subset {result['subset']}"
                           + (f", LoRA rank {result['lora_rank']}" if result.get("lora_rank") else "") + ")"),
        ("settings", ", ".join(f"{k}={v}" for k, v in result["settings"].items())),
        ("compile", fmt(result["compile_s"], " s")),
        ("step (median / mean)", f"{fmt(result['step_s_median'], ' s')} / {fmt(result['step_s_mean'], ' s')}"),
        ("iterations/s", fmt(result["iters_per_s"])),
        ("sampler images/s", fmt(result["images_per_s"])),
        ("FLOPs / iteration", fmt(result["flops_per_iter"] / 1e12 if result["flops_per_iter"] else None, " TFLOP")),
        ("achieved", fmt(result["achieved_flops_per_s"] / 1e12 if result["achieved_flops_per_s"] else None,
                         " TFLOP/s")),
        ("MFU", fmt(result["mfu"] * 100 if result["mfu"] is not None else None, " %")),
        ("peak memory / device", fmt(result["peak_memory_bytes"] / gib if result["peak_memory_bytes"] else None,
                                     f" GiB ({result['peak_memory_source']})")),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
