"""The UNet: same tree and outputs as diffusers' Flax UNet; decoupled attention by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from coerase_jax.errors import UserError
from coerase_jax.models.presets import random_params
from coerase_jax.models.unet import Attention, Precision, UNet, UNetConfig, cross_attention_paths, split_image_kv
from tolerance import BF16, assert_same_maths, tolerance, unet_forward_roundings

# Cross-attention in down, mid and up blocks; channels multiple of 32 (diffusers' Flax GroupNorm).
PARITY_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4), cross_attention_dim=32,
)


def _inputs(batch=2, dim=32, seq=77):
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(keys[0], (batch, 4, 8, 8))
    t = jnp.array([10, 731][:batch])
    text = jax.random.normal(keys[1], (batch, seq, dim))
    image = jax.random.normal(keys[2], (batch, 4, dim))
    return x, t, text, image


@pytest.mark.cross_program
def test_matches_diffusers_flax_unet_on_same_params():
    from diffusers import FlaxUNet2DConditionModel

    reference = FlaxUNet2DConditionModel(**PARITY_CONFIG)
    ref_params = random_params(reference.init_weights, np.random.default_rng(0))
    ours = UNet(UNetConfig(**PARITY_CONFIG), precision=Precision(numerics="diffusers_flax"))

    shapes = lambda tree: {k: v.shape for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    assert shapes(jax.eval_shape(ours.init_params, jax.random.PRNGKey(1))) == shapes(ref_params)
    assert len(shapes(ref_params)) > 150

    x, t, text, _ = _inputs()
    expected = jax.jit(lambda p: reference.apply({"params": p}, x, t, text).sample)(ref_params)
    got = jax.jit(lambda p: ours.apply({"params": p}, x, t, text))(ref_params)
    assert float(jnp.abs(expected).max()) > 0.1
    # two implementations of the same forward
    assert_same_maths(got, expected, unet_forward_roundings(UNetConfig(**PARITY_CONFIG)))


def test_torch_numerics_differ_from_diffusers_flax_numerics():
    """The two numerics settings are really different computations (exact vs tanh GELU, eps)."""
    cfg = UNetConfig(**PARITY_CONFIG)
    params = random_params(UNet(cfg).init_params, np.random.default_rng(0))
    x, t, text, _ = _inputs()
    run = jax.jit(lambda p, numerics: UNet(cfg, precision=Precision(numerics=numerics)).apply(
        {"params": p}, x, t, text), static_argnums=1)
    a, b = run(params, "torch"), run(params, "diffusers_flax")
    assert 1e-6 < float(jnp.abs(a - b).max()) < 1e-1


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.cross_program
def test_decoupled_attention_equals_numpy():
    heads, dim = 2, 8
    layer = Attention(heads, Precision(), with_image_kv=True)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(keys[0], (1, 5, dim))
    text = jax.random.normal(keys[1], (1, 7, dim))
    image = jax.random.normal(keys[2], (1, 4, dim))
    params = layer.init(keys[3], x, text, image)["params"]
    scale = 0.7
    got = np.asarray(layer.apply({"params": params}, x, text, image, scale))

    w = {name: np.asarray(params[name]["kernel"]) for name in ("to_q", "to_k", "to_v", "to_k_ip", "to_v_ip")}
    x_, t_, i_ = (np.asarray(a[0]) for a in (x, text, image))
    d = dim // heads
    q, k, v, kp, vp = x_ @ w["to_q"], t_ @ w["to_k"], t_ @ w["to_v"], i_ @ w["to_k_ip"], i_ @ w["to_v_ip"]
    out = np.zeros((5, dim))
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        out[:, s] = (_softmax(q[:, s] @ k[:, s].T / np.sqrt(d)) @ v[:, s]
                     + scale * _softmax(q[:, s] @ kp[:, s].T / np.sqrt(d)) @ vp[:, s])
    expected = out @ np.asarray(params["to_out_0"]["kernel"]) + np.asarray(params["to_out_0"]["bias"])
    # float32 vs float64: the longest path is q and k (width 8), the scores, softmax over 7 keys, 7 values, to_out
    assert_same_maths(got[0], expected, 8 + 4 + 7 + 7 + 8 + 8)


@pytest.mark.cross_program
def test_image_scale_zero_equals_no_image_tokens():
    cfg = UNetConfig(**PARITY_CONFIG)
    unet = UNet(cfg, with_image_kv=True)
    params = random_params(unet.init_params, np.random.default_rng(0))
    x, t, text, image = _inputs()
    run = jax.jit(lambda image, scale: unet.apply({"params": params}, x, t, text, image, scale))
    plain = jax.jit(lambda: unet.apply({"params": params}, x, t, text))()
    scaled_off, with_image = run(image, 0.0), run(image, 1.0)
    # two programs (the image branch times 0 is added, or absent): the same maths, fused differently
    assert_same_maths(scaled_off, plain, unet_forward_roundings(cfg))
    assert float(jnp.abs(with_image - plain).max()) > 1e-3  # the image tokens do reach the output


def test_image_tokens_are_not_carved_out_of_text():
    """The reference treats the last 4 text tokens as image tokens; ours never looks at them that way."""
    cfg = UNetConfig(**PARITY_CONFIG)
    ip_unet = UNet(cfg, with_image_kv=True)
    params = random_params(ip_unet.init_params, np.random.default_rng(0))
    x, t, text, _ = _inputs()
    plain_params, _ = split_image_kv(params)
    a = jax.jit(lambda p: ip_unet.apply({"params": p}, x, t, text))(params)
    b = jax.jit(lambda p: UNet(cfg).apply({"params": p}, x, t, text))(plain_params)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_image_tokens_without_image_kv_is_an_error():
    cfg = UNetConfig(**PARITY_CONFIG)
    unet = UNet(cfg)
    params = random_params(unet.init_params, np.random.default_rng(0))
    x, t, text, image = _inputs()
    with pytest.raises(UserError, match="without IP-Adapter"):
        jax.eval_shape(lambda: unet.apply({"params": params}, x, t, text, image))


def test_cross_attention_order_is_diffusers_processor_order():
    params = jax.eval_shape(UNet(UNetConfig(**PARITY_CONFIG), with_image_kv=True).init_params, jax.random.PRNGKey(0))
    order = [".".join(p[:2]) for p in cross_attention_paths(params)]
    # down blocks, then up blocks, then the mid block (diffusers registers up_blocks before mid_block)
    assert order == ["down_blocks_0.attentions_0", "down_blocks_1.attentions_0",
                     "up_blocks_1.attentions_0", "up_blocks_1.attentions_1",
                     "up_blocks_2.attentions_0", "up_blocks_2.attentions_1", "mid_block.attentions_0"]


@pytest.mark.cross_program
def test_remat_and_bf16_keep_the_function():
    cfg = UNetConfig(sample_size=8, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2,
                     cross_attention_dim=32)
    params = random_params(UNet(cfg).init_params, np.random.default_rng(0))
    x, t, text, _ = _inputs()

    def loss(p, precision):
        return jnp.mean(UNet(cfg, precision=precision).apply({"params": p}, x, t, text) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_value, base_grad = value_and_grad(params, Precision())
    remat_value, remat_grad = value_and_grad(params, Precision(remat="full"))
    # rematerialised: another program; the loss is a forward and a mean over 512 values, a gradient
    # about two forwards more, each a sum of terms as large as the largest gradient
    forward = unet_forward_roundings(cfg) + 2 * 4 * 8 * 8
    assert_same_maths(remat_value, base_value, forward)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(base_grad))
    for a, b in zip(jax.tree_util.tree_leaves(base_grad), jax.tree_util.tree_leaves(remat_grad)):
        assert_same_maths(b, a, 3 * forward, scale=largest)
    # bf16 compute: every rounding is bf16's; the loss is a mean of squares, so twice the relative error
    bf16_value = jax.jit(loss, static_argnums=1)(params, Precision(dtype=jnp.bfloat16))
    assert abs(float(bf16_value) - float(base_value)) <= 2 * tolerance(forward, float(base_value), BF16)


def test_unsupported_unet_config_is_a_clear_error():
    with pytest.raises(UserError, match="class_embed_type"):
        UNetConfig.from_diffusers({"class_embed_type": "timestep", "block_out_channels": [32, 64]})
    with pytest.raises(UserError, match="norm groups"):
        UNetConfig.from_diffusers({**PARITY_CONFIG, "block_out_channels": [48, 64, 64]})
    cfg = UNetConfig.from_diffusers(UNetConfig(**PARITY_CONFIG).to_diffusers())
    assert cfg == UNetConfig(**PARITY_CONFIG)


@pytest.mark.cross_program
def test_chunked_attention_equals_full_attention_with_gradients():
    from coerase_jax.models.unet import QUERY_CHUNK, multihead_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, 2 * QUERY_CHUNK, 8))
    k = jax.random.normal(keys[1], (1, 2 * QUERY_CHUNK, 8))
    v = jax.random.normal(keys[2], (1, 2 * QUERY_CHUNK, 8))

    def run(impl):
        f = lambda q: jnp.sum(multihead_attention(q, k, v, 2, impl) ** 2)
        return jax.jit(jax.value_and_grad(f))(q)

    (full_value, full_grad), (chunked_value, chunked_grad) = run("xla"), run("chunked")
    # two programs: attention over 2048 keys (head width 4, the softmax's sum, the values), then the
    # value sums the squares of all 2048 x 8 outputs; a gradient retraces the attention twice more
    attention = 4 + 2 * (2 * QUERY_CHUNK)
    assert_same_maths(chunked_value, full_value, attention + 2 * QUERY_CHUNK * 8)
    assert_same_maths(chunked_grad, full_grad, 3 * attention)
    with pytest.raises(UserError, match="attention_impl"):
        Precision(attention_impl="flash")


def _diffusers_fields(cfg: UNetConfig) -> dict:
    """Our config as diffusers' Flax UNet takes it. It has no upcast_attention (in float32 a no-op)
    and fixes norm_num_groups 32 and norm_eps 1e-5, which our tiny configs use."""
    import dataclasses

    from diffusers import FlaxUNet2DConditionModel

    assert (cfg.norm_num_groups, cfg.norm_eps) == (32, 1e-5)
    accepted = {f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in accepted}


@pytest.mark.cross_program
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_matches_diffusers_flax_unet_for_sd2_and_sdxl(family):
    """SD 2.x (heads per block, linear projections, upcast attention) and SDXL (text_time, two
    transformer layers in a block, no attention in the first block): the tiny presets' UNets."""
    from diffusers import FlaxUNet2DConditionModel

    from coerase_jax.models.presets import TINY_SD2_UNET, TINY_SDXL_UNET

    cfg = {"sd2": TINY_SD2_UNET, "sdxl": TINY_SDXL_UNET}[family]
    reference = FlaxUNet2DConditionModel(**_diffusers_fields(cfg))
    ref_params = random_params(reference.init_weights, np.random.default_rng(0))
    ours = UNet(cfg, precision=Precision(numerics="diffusers_flax"))
    shapes = lambda tree: {k: v.shape for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    assert shapes(jax.eval_shape(ours.init_params, jax.random.PRNGKey(1))) == shapes(ref_params)

    x, t, text, _ = _inputs(dim=cfg.cross_attention_dim)
    added_kwargs, added, roundings = None, None, unet_forward_roundings(cfg)
    if family == "sdxl":
        assert "add_embedding" in ref_params
        assert "transformer_blocks_1" in ref_params["down_blocks_1"]["attentions_0"]
        pooled = jax.random.normal(jax.random.PRNGKey(5), (2, cfg.added_text_dim))
        time_ids = jnp.asarray([[32.0, 32, 0, 0, 32, 32], [24, 40, 4, 8, 32, 32]])
        added_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
        added = jnp.concatenate([pooled, time_ids], axis=-1)
        roundings += cfg.projection_class_embeddings_input_dim + 4 * cfg.block_out_channels[0]  # add_embedding
    expected = jax.jit(lambda p: reference.apply({"params": p}, x, t, text, added_kwargs).sample)(ref_params)
    got = jax.jit(lambda p: ours.apply({"params": p}, x, t, text, added_cond=added))(ref_params)
    assert float(jnp.abs(expected).max()) > 0.1
    assert float(jnp.abs(got - expected).max()) <= 1e-4  # the bound; the derived one is tighter
    assert_same_maths(got, expected, roundings)


def test_text_time_conditioning_is_required_and_used():
    from coerase_jax.models.presets import TINY_SDXL_UNET

    unet = UNet(TINY_SDXL_UNET)
    params = random_params(unet.init_params, np.random.default_rng(0))
    x, t, text, _ = _inputs(dim=64)
    with pytest.raises(UserError, match="added_cond"):
        jax.eval_shape(lambda: unet.apply({"params": params}, x, t, text))
    run = jax.jit(lambda added: unet.apply({"params": params}, x, t, text, added_cond=added))
    added = jnp.concatenate([jnp.ones((2, 32)), jnp.tile(jnp.asarray([[32.0, 32, 0, 0, 32, 32]]), (2, 1))], -1)
    other_size = added.at[:, -2:].set(24.0)  # another target size: the time ids reach the output
    no_text = added.at[:, :32].set(0.0)  # the pooled text reaches it too
    base = run(added)
    assert float(jnp.abs(run(other_size) - base).max()) > 1e-3
    assert float(jnp.abs(run(no_text) - base).max()) > 1e-3


def test_upcast_attention_runs_bf16_attention_in_float32():
    from coerase_jax.models.unet import multihead_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, 64, 16), jnp.bfloat16) * 4 for key in keys)
    upcast = jax.jit(lambda q, k, v: multihead_attention(q, k, v, 2, None, upcast=True))(q, k, v)
    in_f32 = jax.jit(lambda q, k, v: multihead_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                         v.astype(jnp.float32), 2, None))(q, k, v)
    plain = jax.jit(lambda q, k, v: multihead_attention(q, k, v, 2, None))(q, k, v)
    assert upcast.dtype == jnp.bfloat16
    # the same float32 program, rounded to bf16 once at the end
    np.testing.assert_array_equal(np.asarray(upcast), np.asarray(in_f32.astype(jnp.bfloat16)))
    assert float(jnp.abs(plain.astype(jnp.float32) - upcast.astype(jnp.float32)).max()) > 0  # bf16 scores differ


def test_sd21_and_sdxl_configs_read_from_their_diffusers_json():
    from coerase_jax.models.presets import SD21_UNET, SDXL_UNET

    sdxl_json = {**SDXL_UNET.to_diffusers(), "upcast_attention": None, "addition_embed_type_num_heads": 64}
    assert UNetConfig.from_diffusers(sdxl_json) == SDXL_UNET
    assert (SDXL_UNET.added_text_dim, SDXL_UNET.added_time_ids, SDXL_UNET.added_cond_dim) == (1280, 6, 1286)
    assert UNetConfig.from_diffusers(SD21_UNET.to_diffusers()) == SD21_UNET
    with pytest.raises(UserError, match="addition_embed_type"):
        UNetConfig.from_diffusers({**sdxl_json, "addition_embed_type": "image"})


def test_sdxl_has_70_cross_attention_layers_in_processor_order():
    """IP-Adapter SDXL numbers ip_adapter.{1,3,...,139} over these, down blocks, up blocks, mid block."""
    from coerase_jax.models.presets import SDXL_UNET

    params = jax.eval_shape(UNet(SDXL_UNET, with_image_kv=True).init_params, jax.random.PRNGKey(0))
    paths = cross_attention_paths(params)
    assert len(paths) == 70
    assert [p[0] for p in paths] == ["down_blocks_1"] * 4 + ["down_blocks_2"] * 20 + ["up_blocks_0"] * 30 + \
        ["up_blocks_1"] * 6 + ["mid_block"] * 10
    # within a block: attentions first, then its transformer layers in numeric order (1 < 2 < 10)
    assert [p[1:3] for p in paths[4:15]] == [("attentions_0", f"transformer_blocks_{i}") for i in range(10)] + \
        [("attentions_1", "transformer_blocks_0")]
    assert subtree_shape(params, paths[0]) == (2048, 640)  # to_k_ip: 2048-d image tokens into 640 channels


def subtree_shape(params, path):
    from coerase_jax.models.unet import subtree

    return subtree(params, path)["to_k_ip"]["kernel"].shape
