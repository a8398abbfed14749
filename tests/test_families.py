"""SD 2.x and SDXL end to end on their tiny presets: the commands a user runs (erase with both
stages, export, sample, eval, LoRA, side-by-side sweeps, bench), each in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHORT = ["--config.text_stage.steps=2", "--config.image_stage.steps=2", "--config.erase.ddim_steps=4",
         "--config.data.num_references=2", "--config.data.reference_steps=2", "--config.data.reference_batch_size=2",
         "--config.checkpoint.every=2"]
FAMILIES = [("configs/sdxl.py:nudity", "tiny-sdxl"), ("configs/sd21.py:nudity", "tiny-sd2")]


def coerase(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device in the child: batch 1
    result = subprocess.run([sys.executable, "-m", "coerase_jax.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # (measured 177 s SDXL, 137 s SD 2.x, 2 shared cores: references, both stages, export, sample, eval)
@pytest.mark.parametrize("config, preset", FAMILIES)
def test_erase_both_stages_then_export_sample_and_eval(config, preset, tmp_path):
    from coerase_jax.configuration import load_config
    from coerase_jax.erase.trainer import final_params
    from coerase_jax.models.bundle import load_bundle, load_unet

    run_dir = tmp_path / "run"
    source = f"--config.model.source={preset}"
    coerase("erase", "--config", config, source, "--run-dir", str(run_dir), *SHORT)
    for stage in ("text", "image"):
        assert (run_dir / f"stage_{stage}" / "done.json").is_file()

    coerase("export", "--run", str(run_dir), "--out", str(tmp_path / "erased"))
    exported = json.loads((tmp_path / "erased" / "unet" / "config.json").read_text())
    if preset == "tiny-sdxl":
        assert (exported["addition_embed_type"], exported["transformer_layers_per_block"]) == ("text_time", [1, 2])
    else:
        assert exported["upcast_attention"] and exported["use_linear_projection"]
    # the exported UNet is the trained one, read back through the loader, exactly
    bundle = load_bundle(preset)
    trained = final_params(load_config(config, [source, f"--config.run_dir={run_dir}", *SHORT]), bundle)
    _, back = load_unet(tmp_path / "erased" / "unet")
    from coerase_jax.models.unet import split_image_kv
    from flax import traverse_util
    plain = traverse_util.flatten_dict(split_image_kv(trained)[0])
    assert any(np.abs(np.asarray(plain[k]) - np.asarray(v)).max() > 0  # (training changed it)
               for k, v in traverse_util.flatten_dict(bundle.unet_params).items() if k in plain)
    for key, value in traverse_util.flatten_dict(back).items():
        np.testing.assert_array_equal(value, np.asarray(plain[key], np.float32))
    _torch_loads_and_matches(tmp_path / "erased" / "unet", bundle, back)

    coerase("sample", "--config", config, source, "--prompt", "a cat", "--out", str(tmp_path / "samples"),
             "--config.sample.steps=2", "--config.sample.num_images_per_prompt=2")
    assert (tmp_path / "samples" / "grid.png").is_file()
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n0,nudity,1\n1,a photo of a cat,2\n")
    coerase("eval", "--config", config, source, "--run", str(run_dir), "--out", str(tmp_path / "eval"),
            f"--config.eval.prompts={prompts}", "--config.eval.judge=none", "--config.eval.steps=2", *SHORT)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["methods"]) >= {"original", "co_erasing"}


def _torch_loads_and_matches(folder: Path, bundle, params) -> None:
    """With the torch extra: diffusers' torch UNet loads the export and computes what ours does."""
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        return
    import jax

    cfg = bundle.unet_config
    torch_unet = UNet2DConditionModel.from_pretrained(folder).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
    kwargs, added = {}, None
    if cfg.addition_embed_type:
        added = np.concatenate([rng.standard_normal((1, cfg.added_text_dim)), [[32, 32, 0, 0, 32, 32]]], -1)
        added = added.astype(np.float32)
        kwargs = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(added[:, :cfg.added_text_dim]),
                                        "time_ids": torch.from_numpy(added[:, cfg.added_text_dim:])}}
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(x), torch.tensor([500]), torch.from_numpy(text), **kwargs).sample.numpy()
    from coerase_jax.models.unet import UNet

    got = jax.jit(lambda p: UNet(cfg).apply({"params": p}, x, np.array([500]), text, added_cond=added))(params)
    assert np.abs(np.asarray(got) - expected).max() <= 1e-4


@pytest.mark.slow  # (measured 124 s: a LoRA run with its export, and a sweep side by side, on tiny-sdxl)
def test_sdxl_lora_export_and_a_side_by_side_sweep(tmp_path):
    coerase("erase", "--config", "configs/sdxl.py:nudity", "--config.model.source=tiny-sdxl", "--run-dir",
            str(tmp_path / "lora"), "--config.erase.lora_rank=4", "--config.text_stage.subset=esd-x",
            "--config.image_stage.subset=esd-x", *SHORT)
    coerase("export", "--run", str(tmp_path / "lora"), "--out", str(tmp_path / "lora_out"))
    assert (tmp_path / "lora_out" / "pytorch_lora_weights.safetensors").is_file()
    result = coerase("sweep", "--config", "configs/sweep_tiny.py", "--config.model.source=tiny-sdxl",
                     "--config.text_stage.subset=esd-x", "--out", str(tmp_path / "sweep"))
    assert "side by side" in result.stdout
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 5  # header + 2 concepts x 2 rates


@pytest.mark.slow  # (measured 61-66 s each: bench compiles and times a tiny family's image stage)
@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_bench_runs_on_both_tiny_families(preset, tmp_path):
    out = tmp_path / "bench.json"
    coerase("bench", "--config", "configs/tiny.py", f"--config.model.source={preset}", "--config.bench.steps=2",
            "--config.bench.warmup=1", "--config.erase.stages=('image',)", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["flops_per_iter"] > 0 and result["iters_per_s"] > 0 and result["images_per_s"] > 0
