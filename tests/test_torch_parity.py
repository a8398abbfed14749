"""With the optional torch extra: our exported UNet (and IP-Adapter file) in diffusers' PyTorch UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="optional: pip install 'coerase-jax[torch]' for PyTorch parity")

from coerase_jax.models import convert  # noqa: E402
from coerase_jax.models.export import export_unet  # noqa: E402


def _inputs(bundle):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([17, 640], np.int32)
    text = rng.standard_normal((2, 77, 32)).astype(np.float32)
    embeds = rng.standard_normal((2, 32)).astype(np.float32)
    return x, t, text, embeds


def test_exported_unet_matches_diffusers_torch_unet(tiny_bundle, tmp_path):
    from diffusers import UNet2DConditionModel

    b = tiny_bundle
    export_unet(b.unet_params, b.unet_config, tmp_path / "unet")
    torch_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, t, text, _ = _inputs(b)
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
    got = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_ip_adapter_file_matches_diffusers_torch_ip_adapter(tiny_bundle, tiny_folder):
    """Same IP-Adapter file in both: proves the ip_adapter.{1,3,5,...} numbering and image_proj layout."""
    from diffusers import UNet2DConditionModel

    b = tiny_bundle
    torch_unet = UNet2DConditionModel.from_pretrained(tiny_folder / "unet").eval()
    state = convert.read_safetensors(tiny_folder / "ip-adapter_sd15.safetensors")
    split = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, _, rest = key.partition(".")
        split[group][rest] = torch.from_numpy(np.array(value))
    torch_unet._load_ip_adapter_weights([split])
    x, t, text, embeds = _inputs(b)
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                              added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds)[:, None, :]]}).sample.numpy()
    tokens = b.image_tokens(b.image.proj_params, jnp.asarray(embeds))
    got = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text, tokens))
    plain = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text))
    assert np.abs(got - plain).max() > 1e-3  # the image tokens matter
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_exported_lora_loads_into_diffusers_torch_unet(tiny_bundle, tmp_path):
    """Our LoRA file through diffusers' own LoRA loader (needs peft) equals W + s·AB in our UNet."""
    pytest.importorskip("peft", reason="optional: diffusers loads LoRA files through peft")
    from diffusers import UNet2DConditionModel

    from coerase_jax.erase import lora

    b = tiny_bundle
    factors = lora.init_lora(b.unet_params, "esd-x", 4, jax.random.PRNGKey(0))
    factors = {k: {"A": f["A"], "B": 0.05 * jax.random.normal(jax.random.PRNGKey(i), f["B"].shape)}
               for i, (k, f) in enumerate(factors.items())}
    path = lora.export_lora(factors, 2.0, tmp_path / "lora")
    export_unet(b.unet_params, b.unet_config, tmp_path / "unet")
    torch_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in convert.read_safetensors(path).items()}
    torch_unet.load_lora_adapter(state, prefix="unet", adapter_name="erased")
    x, t, text, _ = _inputs(b)
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
    params = lora.apply_lora(b.unet_params, factors, 2.0)
    got = np.asarray(jax.jit(b.unet_eps)(params, x, t, text))
    base = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text))
    assert np.abs(got - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def _sdxl_added(batch: int, pooled_dim: int):
    pooled = np.random.default_rng(3).standard_normal((batch, pooled_dim)).astype(np.float32)
    time_ids = np.asarray([[32, 32, 0, 0, 32, 32], [24, 40, 4, 8, 32, 32]][:batch], np.float32)
    return pooled, time_ids


@pytest.mark.cross_program
@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_exported_sd2_and_sdxl_unets_match_diffusers_torch_unet(preset, tmp_path):
    from diffusers import UNet2DConditionModel

    from coerase_jax.models.bundle import load_bundle
    from tolerance import assert_same_maths, unet_forward_roundings

    b = load_bundle(preset)
    cfg = b.unet_config
    export_unet(b.unet_params, cfg, tmp_path / "unet")
    torch_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert torch_unet.config.upcast_attention == cfg.upcast_attention
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([17, 640], np.int32)
    text = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    kwargs, added, roundings = {}, None, unet_forward_roundings(cfg)
    if cfg.addition_embed_type:
        pooled, time_ids = _sdxl_added(2, cfg.added_text_dim)
        kwargs = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled),
                                        "time_ids": torch.from_numpy(time_ids)}}
        added = np.concatenate([pooled, time_ids], axis=-1)
        roundings += cfg.projection_class_embeddings_input_dim + 4 * cfg.block_out_channels[0]
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text), **kwargs).sample.numpy()
    got = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text, None, 1.0, added))
    assert np.abs(expected).max() > 0.1
    assert np.abs(got - expected).max() <= 1e-4
    assert_same_maths(got, expected, roundings)


@pytest.mark.cross_program
def test_sdxl_ip_adapter_file_matches_diffusers_torch_ip_adapter(tiny_sdxl_bundle):
    """The tiny SDXL IP-Adapter file (ip_adapter.{1,3,...} over its cross-attention layers in
    processor order, 4 tokens of the 2-tower width) through diffusers' own torch loader."""
    from diffusers import UNet2DConditionModel

    from coerase_jax.models import presets
    from tolerance import assert_same_maths, unet_forward_roundings

    b = tiny_sdxl_bundle
    folder = presets.materialise("tiny-sdxl")
    torch_unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    state = convert.read_safetensors(folder / "ip-adapter_sdxl.safetensors")
    split = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, _, rest = key.partition(".")
        split[group][rest] = torch.from_numpy(np.array(value))
    torch_unet._load_ip_adapter_weights([split])
    cfg = b.unet_config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([17, 640], np.int32)
    text = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    embeds = rng.standard_normal((2, 32)).astype(np.float32)
    pooled, time_ids = _sdxl_added(2, cfg.added_text_dim)
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text), added_cond_kwargs={
            "image_embeds": [torch.from_numpy(embeds)[:, None, :]], "text_embeds": torch.from_numpy(pooled),
            "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    tokens = b.image_tokens(b.image.proj_params, jnp.asarray(embeds))
    added = np.concatenate([pooled, time_ids], axis=-1)
    got = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text, tokens, 1.0, added))
    plain = np.asarray(jax.jit(b.unet_eps)(b.unet_params, x, t, text, None, 1.0, added))
    assert np.abs(got - plain).max() > 1e-3  # the image tokens matter
    assert np.abs(got - expected).max() <= 1e-4
    # the image path adds the projection (E inputs, then a LayerNorm over D) and a second attention
    roundings = unet_forward_roundings(cfg) + cfg.projection_class_embeddings_input_dim + 4 * cfg.block_out_channels[0]
    assert_same_maths(got, expected, roundings + 32 + 64 + 4 * 64)
