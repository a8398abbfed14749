"""Weights in and out without torch: exact round trips and a hand-built PyTorch-layout file."""

import numpy as np
import pytest
from flax import traverse_util

from coerase_jax.errors import UserError
from coerase_jax.models import convert, presets
from coerase_jax.models import vae as vae_lib
from coerase_jax.models.bundle import load_unet
from coerase_jax.models.clip import CLIPImageEncoder, CLIPTextEncoder
from coerase_jax.models.export import export_unet
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models.presets import TINY_UNET, TINY_VAE, random_params
from coerase_jax.models.unet import UNet, cross_attention_paths, split_image_kv


def _flat(tree):
    return traverse_util.flatten_dict(tree)


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def _components():
    rng = np.random.default_rng(0)
    vae = vae_lib.build_vae(TINY_VAE)
    text = CLIPTextEncoder(presets.tiny_text_config(514))
    vision = CLIPImageEncoder(presets.tiny_vision_config())
    return {
        "unet": random_params(UNet(TINY_UNET).init_params, rng),
        "vae": random_params(lambda r: vae_lib.init_vae_params(vae, r), rng),
        "text_encoder": random_params(text.init_params, rng),
        "image_encoder": random_params(vision.init_params, rng),
        "image_proj": random_params(lambda r: ImageProjection(32, 4).init_params(r, 32), rng),
    }


@pytest.mark.parametrize("name", ["unet", "vae", "text_encoder", "image_encoder", "image_proj"])
def test_round_trip_through_a_safetensors_file_is_exact(name, tmp_path):
    params = _components()[name]
    path = tmp_path / "weights.safetensors"
    convert.write_safetensors(path, convert.flax_to_torch_state(params))
    back = convert.torch_state_to_flax(convert.read_safetensors(path), params, name)
    _assert_trees_equal(back, params)


def test_ip_adapter_round_trip_is_exact():
    rng = np.random.default_rng(1)
    unet_params = random_params(UNet(TINY_UNET, with_image_kv=True).init_params, rng)
    proj = random_params(lambda r: ImageProjection(32, 4).init_params(r, 32), rng)
    paths = cross_attention_paths(unet_params)
    _, kv = split_image_kv(unet_params)
    state = convert.ip_adapter_from_flax(proj, kv, paths)
    assert sorted(k for k in state if k.startswith("ip_adapter.")) == sorted(
        f"ip_adapter.{n}.{w}.weight" for n in (1, 3, 5, 7) for w in ("to_k_ip", "to_v_ip"))
    kv_shapes = {p: kv[p]["to_k_ip"]["kernel"].shape for p in paths}
    proj_back, kv_back = convert.ip_adapter_to_flax(state, paths, proj, kv_shapes)
    _assert_trees_equal(proj_back, proj)
    for p in paths:
        _assert_trees_equal(kv_back[p], kv[p])


def _known(shape, offset):
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + offset) / 1000.0


def test_hand_built_unet_file_lands_on_the_right_leaves(tmp_path):
    unet_params = random_params(UNet(TINY_UNET).init_params, np.random.default_rng(2))
    export_unet(unet_params, TINY_UNET, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = convert.read_safetensors(path)
    conv_in = _known((32, 4, 3, 3), 1)  # PyTorch conv: (out, in, kh, kw)
    to_q = _known((32, 32), 2)  # PyTorch linear: (out, in)
    norm1 = _known((32,), 3)
    geglu = _known((256, 32), 4)
    time_linear = _known((128, 32), 5)
    state["conv_in.weight"] = conv_in
    state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] = to_q
    state["down_blocks.0.resnets.0.norm1.weight"] = norm1
    state["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"] = geglu
    state["time_embedding.linear_1.weight"] = time_linear
    convert.write_safetensors(path, state)

    _, params = load_unet(tmp_path)
    np.testing.assert_array_equal(params["conv_in"]["kernel"][1, 2, 3, 4], conv_in[4, 3, 1, 2])
    np.testing.assert_array_equal(params["conv_in"]["kernel"], conv_in.transpose(2, 3, 1, 0))
    block = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    np.testing.assert_array_equal(block["attn1"]["to_q"]["kernel"], to_q.T)
    np.testing.assert_array_equal(block["ff"]["net_0"]["proj"]["kernel"], geglu.T)
    np.testing.assert_array_equal(params["down_blocks_0"]["resnets_0"]["norm1"]["scale"], norm1)
    np.testing.assert_array_equal(params["time_embedding"]["linear_1"]["kernel"], time_linear.T)


def test_old_vae_attention_names_and_conv_shaped_linears_are_read(tmp_path):
    vae = vae_lib.build_vae(TINY_VAE)
    params = random_params(lambda r: vae_lib.init_vae_params(vae, r), np.random.default_rng(3))
    state = convert.flax_to_torch_state(params)
    prefix = "decoder.mid_block.attentions.0."
    assert f"{prefix}to_q.weight" in state and f"{prefix}to_out.0.bias" in state
    query = _known((64, 64), 6)
    state[f"{prefix}query.weight"] = query[:, :, None, None]  # 1x1 conv, as pre-0.14 diffusers stored it
    del state[f"{prefix}to_q.weight"]
    state[f"{prefix}proj_attn.bias"] = state.pop(f"{prefix}to_out.0.bias")
    back = convert.torch_state_to_flax(state, params, "vae")
    np.testing.assert_array_equal(back["decoder"]["mid_block"]["attentions_0"]["query"]["kernel"], query.T)
    np.testing.assert_array_equal(back["decoder"]["mid_block"]["attentions_0"]["proj_attn"]["bias"],
                                  params["decoder"]["mid_block"]["attentions_0"]["proj_attn"]["bias"])


def test_clip_leaves_map_without_transposing_tables():
    vision = CLIPImageEncoder(presets.tiny_vision_config())
    params = random_params(vision.init_params, np.random.default_rng(4))
    state = convert.flax_to_torch_state(params)
    emb = params["vision_model"]["embeddings"]
    np.testing.assert_array_equal(state["vision_model.embeddings.class_embedding"], emb["class_embedding"])
    np.testing.assert_array_equal(state["vision_model.embeddings.position_embedding.weight"],
                                  emb["position_embedding"]["embedding"])
    np.testing.assert_array_equal(state["vision_model.embeddings.patch_embedding.weight"],
                                  emb["patch_embedding"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state["visual_projection.weight"], params["visual_projection"]["kernel"].T)
    assert "vision_model.pre_layrnorm.weight" in state  # CLIP's own spelling


def test_ip_adapter_numbering_follows_processor_order():
    unet_params = random_params(UNet(TINY_UNET, with_image_kv=True).init_params, np.random.default_rng(5))
    proj = random_params(lambda r: ImageProjection(32, 4).init_params(r, 32), np.random.default_rng(6))
    paths = cross_attention_paths(unet_params)
    _, kv = split_image_kv(unet_params)
    state = convert.ip_adapter_from_flax(proj, kv, paths)
    marker = _known((64, 32), 7)  # (inner 64 channels, cross-attention dim 32)
    state["ip_adapter.7.to_v_ip.weight"] = marker  # the 4th cross-attention layer: the mid block
    kv_shapes = {p: kv[p]["to_k_ip"]["kernel"].shape for p in paths}
    _, kv_back = convert.ip_adapter_to_flax(state, paths, proj, kv_shapes)
    mid = ("mid_block", "attentions_0", "transformer_blocks_0", "attn2")
    np.testing.assert_array_equal(kv_back[mid]["to_v_ip"]["kernel"], marker.T)


def test_mismatched_and_missing_weights_are_named():
    params = _components()["text_encoder"]
    state = convert.flax_to_torch_state(params)
    state["text_model.final_layer_norm.weight"] = np.zeros((7,), np.float32)
    del state["text_model.encoder.layers.0.mlp.fc1.bias"]
    state["text_model.extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(UserError) as err:
        convert.torch_state_to_flax(state, params, "text_encoder")
    message = str(err.value)
    assert "text_model.final_layer_norm.weight: file has shape (7,)" in message
    assert "missing text_model.encoder.layers.0.mlp.fc1.bias" in message
    assert "unexpected text_model.extra.weight" in message
