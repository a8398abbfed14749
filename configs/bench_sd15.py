"""Benchmark shapes: SD 1.5 at 512x512 (64x64 latents), full-UNet Co-Erasing image stage.

No weights are needed: parameters are random (or only shapes, with --compile-only).

    coerase bench --config configs/bench_sd15.py --json out/bench.json            # on an accelerator
    coerase bench --config configs/bench_sd15.py --compile-only --simulate-devices 4 \\
        --config.mesh.data=1 --config.mesh.fsdp=4                                  # memory check on CPU
"""

from coerase_jax.configuration import base_config


def get_config():
    config = base_config(source="sd15")
    config.bench.shapes = "sd15"
    config.erase.stages = ("image",)
    config.image_stage.subset = "full"
    config.erase.batch_size = 1
    config.erase.ddim_steps = 50
    config.erase.teacher_dtype = "bfloat16"
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    config.model.attention_impl = "chunked"  # query-chunked, rematerialised; "cudnn" on NVIDIA GPUs
    config.sample.batch_size = 8
    config.sample.steps = 50
    return config
