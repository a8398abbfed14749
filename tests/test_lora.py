"""LoRA as the trainable part: the update's algebra, diffusers' key names, and an exported LoRA that
reproduces the trained UNet when loaded back."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from coerase_jax.configuration import load_config
from coerase_jax.erase import lora
from coerase_jax.erase.trainer import final_lora, final_params, load_stage_trainable, plan_stages, run_erasure
from coerase_jax.errors import UserError
from coerase_jax.models import convert
from coerase_jax.models.presets import TINY_UNET
from coerase_jax.parallel.mesh import make_mesh
from tolerance import assert_same_maths, unet_forward_roundings

REPO = Path(__file__).resolve().parent.parent
ATTN2 = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2")


def test_lora_targets_follow_the_subset_and_start_as_the_original(tiny_bundle):
    params = tiny_bundle.unet_params
    strict = lora.target_paths(params, "esd-x-strict")
    assert strict and all(p[-2] in ("to_k", "to_v") and "attn2" in p for p in strict)
    xattn = lora.target_paths(params, "esd-x")
    assert {p[-2] for p in xattn} == {"to_q", "to_k", "to_v", "to_out_0"} and all("attn2" in p for p in xattn)
    assert not any(p[-2].endswith("_ip") for p in lora.target_paths(params, "full"))  # image K/V never
    factors = lora.init_lora(params, "esd-x", 4, jax.random.PRNGKey(0))
    start = lora.apply_lora(params, factors, 2.0)
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # B = 0: no change yet
    with pytest.raises(UserError, match="holds no attention projection"):
        lora.target_paths({"conv_in": {"kernel": np.zeros((3, 3, 4, 8))}}, "full")


def test_the_update_is_w_plus_scale_a_b():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    a, b = np.array([[1.0], [2.0]], np.float32), np.array([[1.0, 0.0, -1.0]], np.float32)
    params = {"attn2": {"to_k": {"kernel": w}}}
    got = lora.apply_lora(params, {"attn2/to_k/kernel": {"A": a, "B": b}}, 0.5)["attn2"]["to_k"]["kernel"]
    np.testing.assert_allclose(got, [[0.5, 1.0, 1.5], [4.0, 4.0, 4.0]])  # w + 0.5 * [[1,0,-1],[2,0,-2]]
    # two updates as one: concatenated factors give the sum
    two = lora.concatenate([{"k": {"A": a, "B": b}}, {"k": {"A": 2 * a, "B": b}}])["k"]
    np.testing.assert_allclose(two["A"] @ two["B"], 3 * (a @ b))


@pytest.mark.cross_program
def test_export_uses_diffusers_names_and_reads_back(tiny_bundle, tmp_path):
    params = tiny_bundle.unet_params
    factors = lora.init_lora(params, "esd-x", 2, jax.random.PRNGKey(1))
    factors = {k: {"A": f["A"], "B": jnp.ones_like(f["B"]) * 0.01} for k, f in factors.items()}
    path = lora.export_lora(factors, 3.0, tmp_path)
    state = convert.read_safetensors(path)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight"
    kernel = traverse_util.flatten_dict(params)[ATTN2 + ("to_out_0", "kernel")]
    assert state[key].shape == (2, kernel.shape[0])  # torch Linear layout: (r, in) and (out, r)
    assert state[key.replace("lora_A", "lora_B")].shape == (kernel.shape[1], 2)
    assert len(state) == 2 * len(factors)
    back = lora.read_lora(path, params)
    expected, got = lora.apply_lora(params, factors, 3.0), lora.apply_lora(params, back, 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        assert_same_maths(b, a, 2 + 3)  # W + 3 (A B) vs W + A (3 B): a rank-2 product, a scaling, a sum


@pytest.mark.slow  # (47 s; the default run keeps the export-and-read-back test above)
@pytest.mark.cross_program
def test_a_lora_erasure_exports_a_lora_that_reproduces_the_trained_unet(tiny_bundle, tmp_path):
    images = tmp_path / "refs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = load_config(str(REPO / "configs" / "tiny.py"), [
        f"--config.run_dir={tmp_path / 'run'}", f"--config.data.image_dir={images}", "--config.erase.lora_rank=4",
        "--config.erase.lora_alpha=8", "--config.text_stage.subset=esd-x", "--config.image_stage.subset=esd-x",
        "--config.text_stage.steps=4", "--config.image_stage.steps=4", "--config.erase.ddim_steps=4",
        "--config.text_stage.learning_rate=0.01", "--config.image_stage.learning_rate=0.01"])
    trained = run_erasure(config, tiny_bundle, progress=False, mesh=make_mesh({"data": 1}, jax.devices()[:1]))
    text_stage = plan_stages(config)[0]
    saved, _ = load_stage_trainable(text_stage, config, tiny_bundle.unet_params, tmp_path / "run")
    assert set(saved) == {"/".join(p) for p in lora.target_paths(tiny_bundle.unet_params, "esd-x")}
    assert all(set(f) == {"A", "B"} and f["A"].shape[1] == 4 for f in saved.values())  # factors, not the UNet
    np.testing.assert_allclose(  # what the run returns is what its checkpoints rebuild
        np.asarray(traverse_util.flatten_dict(trained)[ATTN2 + ("to_k", "kernel")]),
        np.asarray(traverse_util.flatten_dict(final_params(config, tiny_bundle))[ATTN2 + ("to_k", "kernel")]),
        rtol=1e-6)
    combined = final_lora(config, tiny_bundle)  # both stages, rank 4 + 4
    assert {f["A"].shape[1] for f in combined.values()} == {8}
    path = lora.export_lora(combined, 1.0, tmp_path / "export")
    loaded = lora.apply_lora(tiny_bundle.unet_params, lora.read_lora(path, tiny_bundle.unet_params), 1.0)

    unet = tiny_bundle.unet
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + tuple(tiny_bundle.latent_shape))
    t = jnp.array([500, 100])
    text = jax.random.normal(jax.random.PRNGKey(1), (2, 77, unet.config.cross_attention_dim))
    out = lambda p: np.asarray(unet.apply({"params": p}, x, t, text))
    base, want, got = out(tiny_bundle.unet_params), out(trained), out(loaded)
    assert np.abs(want - base).max() > 1e-4, "the LoRA changed nothing: the comparison would be empty"
    # the stages' updates added one after another vs as one concatenated LoRA: a few roundings per
    # kernel, then the same forward compiled for other weights
    assert_same_maths(got, want, unet_forward_roundings(TINY_UNET) + 8 * 8)
    # only the attention projections moved
    moved = [p for p, v in traverse_util.flatten_dict(trained).items()
             if not np.array_equal(np.asarray(v), np.asarray(traverse_util.flatten_dict(tiny_bundle.unet_params)[p]))]
    assert moved and all(p[-2] in lora.PROJECTIONS and "attn2" in p for p in moved)
