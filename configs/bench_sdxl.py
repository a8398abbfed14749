"""Benchmark shapes: SDXL base at 1024x1024 (128x128 latents), Co-Erasing image stage, batch 1.

No weights are needed: parameters are random (or only shapes, with --compile-only). The image
tokens are IP-Adapter SDXL's (4 x 2048-d from 1024-d ViT-H embeddings); every UNet call carries
the text_time conditioning (pooled text + time ids).

    coerase bench --config configs/bench_sdxl.py --compile-only --simulate-devices 8 \\
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.erase.batch_size=8        # full UNet, FSDP 8
    coerase bench --config configs/bench_sdxl.py --compile-only --config.image_stage.subset=esd-x \\
        --config.mesh.data=1                                                          # esd-x on one device
"""

from coerase_jax.configuration import base_config


def get_config():
    config = base_config(source="sdxl")
    config.bench.shapes = "sdxl"
    config.erase.stages = ("image",)
    config.image_stage.subset = "full"
    config.erase.batch_size = 1
    config.erase.ddim_steps = 50
    config.erase.teacher_dtype = "bfloat16"
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    config.model.attention_impl = "chunked"  # query-chunked, rematerialised; "cudnn" on NVIDIA GPUs
    config.optim.first_moment_dtype = "bfloat16"  # Adam's first moment in bf16 (see docs/benchmarks.md)
    config.sample.batch_size = 1
    config.sample.steps = 50
    config.sample.guidance_scale = 5.0
    return config
