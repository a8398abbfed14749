"""The bundle loader: the tiny preset through the real folder path, and one clear message per bad input."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from coerase_jax.cli import main
from coerase_jax.errors import UserError
from coerase_jax.models import convert
from coerase_jax.models.bundle import load_bundle


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_folder, target)
    return target


def test_tiny_bundle_has_every_part(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["a red circle", ""])
    assert ids.shape == (2, 77) and ids[0, 0] == b.tokenizer.bos_token_id
    text = b.encode_text(b.text_params, ids)
    assert text.shape == (2, 77, 32)
    embeds = b.encode_images(jnp.full((2, 40, 48, 3), 0.5))
    tokens = b.image_tokens(b.image.proj_params, embeds)
    assert embeds.shape == (2, 32) and tokens.shape == (2, 4, 32)
    latents = b.encode_latents(jnp.full((2, 32, 32, 3), 0.5))
    assert latents.shape == (2, 4, 8, 8)
    assert b.decode(latents).shape == (2, 32, 32, 3)


def test_image_parts_are_optional(folder_copy):
    shutil.rmtree(folder_copy / "image_encoder")
    (folder_copy / "ip-adapter_sd15.safetensors").unlink()
    bundle = load_bundle(str(folder_copy))
    assert bundle.image is None and not bundle.unet.with_image_kv


def _error(source, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        load_bundle(str(source), **kwargs)
    return str(err.value)


def test_missing_component(folder_copy):
    shutil.rmtree(folder_copy / "vae")
    assert "missing component 'vae/'" in _error(folder_copy)


def test_missing_weights_file(folder_copy):
    (folder_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert "no diffusion_pytorch_model.safetensors" in _error(folder_copy)


def test_shape_mismatch_names_the_tensor(folder_copy):
    config = folder_copy / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 48'))
    message = _error(folder_copy)
    assert message.startswith("text_encoder: weights do not match its config")
    assert "file has shape" in message


def test_pickle_is_refused_with_the_safetensors_alternative(folder_copy):
    weights = folder_copy / "text_encoder" / "model.safetensors"
    weights.rename(folder_copy / "text_encoder" / "pytorch_model.bin")
    message = _error(folder_copy)
    assert "pickle" in message and "model.safetensors" in message and "model.allow_pickle=true" in message


def test_corrupt_safetensors_is_named(folder_copy):
    (folder_copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read safetensors file" in _error(folder_copy)


def test_unknown_source():
    assert "neither a folder nor a preset" in _error("/nonexistent/model")


def test_allow_pickle_reads_a_torch_file_with_a_warning(folder_copy):
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    folder = folder_copy / "text_encoder"
    state = convert.read_safetensors(folder / "model.safetensors")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match="unpickling"):
        bundle = load_bundle(str(folder_copy), allow_pickle=True)
    assert bundle.text_params["text_model"]["final_layer_norm"]["scale"].shape == (32,)


def test_cli_reports_loader_errors_in_one_line(folder_copy, tmp_path, capsys):
    shutil.rmtree(folder_copy / "unet")
    code = main(["sample", f"--config.model.source={folder_copy}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("coerase: error:") and "missing component 'unet/'" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_tiny_sd2_reads_v_prediction_upcast_attention_and_openclip_padding():
    from coerase_jax.diffusion.schedule import NoiseSchedule

    b = load_bundle("tiny-sd2")
    assert NoiseSchedule.from_config(b.scheduler_config).prediction_type == "v_prediction"
    cfg = b.unet_config
    assert cfg.upcast_attention and cfg.use_linear_projection and cfg.heads == [2, 4]
    assert b.text_encoder.config.hidden_act == "gelu" and not b.zero_empty_prompt
    ids = b.tokenize(["a red circle"])
    assert ids[0, -1] == 0 == b.tokenizer.pad_token_id  # OpenCLIP's "!" padding
    states, added = b.encode_conditioning(b.text_params, ids)
    assert states.shape == (1, 77, 32) and added is None


def test_sd2_image_stage_without_an_ip_adapter_says_what_to_set(tmp_path):
    from coerase_jax.models import presets

    folder = tmp_path / "sd2"
    shutil.copytree(presets.materialise("tiny-sd2"), folder)
    adapter = (folder / "ip-adapter_sd21.safetensors").rename(tmp_path / "any-ip-adapter.safetensors")
    bundle = load_bundle(str(folder))
    with pytest.raises(UserError, match="model.ip_adapter.*SD 2.x has no official one"):
        bundle.require_image_parts()
    assert load_bundle(str(folder), ip_adapter=str(adapter)).image is not None  # any file whose shapes fit


@pytest.mark.cross_program
def test_tiny_sdxl_conditions_the_unet_as_diffusers_sdxl_does(tiny_sdxl_bundle):
    """Both towers' penultimate hidden states side by side, the second tower's projected pooled
    embedding and the time ids [H, W, 0, 0, H, W]: checked against transformers' own towers."""
    from transformers import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    from tolerance import assert_same_maths

    b = tiny_sdxl_bundle
    ids = b.tokenize(["a red circle", "a blue square"])
    assert ids.shape == (2, 2, 77)
    eos = b.tokenizer.eos_token_id
    assert ids[0, 0, -1] == eos and ids[0, 1, -1] == 0  # the second tokenizer pads with "!"
    first_eos = int(np.argmax(ids[0, 0] == eos))
    np.testing.assert_array_equal(ids[:, 0, :first_eos + 1], ids[:, 1, :first_eos + 1])
    states, added = b.encode_conditioning(b.text_params, ids)

    one = FlaxCLIPTextModel(b.text_encoder.config, _do_init=False)(
        ids[:, 0], params=b.text_params["text_encoder"], output_hidden_states=True)
    two = FlaxCLIPTextModelWithProjection(b.text_encoder.config_2, _do_init=False)(
        ids[:, 1], params=b.text_params["text_encoder_2"], output_hidden_states=True)
    expected = np.concatenate([one.hidden_states[-2], two.hidden_states[-2]], axis=-1)
    clip_roundings = 2 * (4 * 32 + 77 + 64 + 32) + 32  # two layers: projections, scores, MLP; the last LayerNorm
    assert_same_maths(states, expected, clip_roundings)
    assert np.abs(np.asarray(states[..., :32]) - np.asarray(one.last_hidden_state)).max() > 1e-2  # not after the LN
    assert_same_maths(added[:, :32], two.text_embeds, clip_roundings + 32)
    np.testing.assert_array_equal(np.asarray(added[:, 32:]), [[32, 32, 0, 0, 32, 32]] * 2)
    assert b.vae_scale == 0.13025 and b.image_size == 32


def test_sdxl_empty_prompt_is_zeros_unless_asked_to_encode(tiny_sdxl_bundle):
    b = tiny_sdxl_bundle
    empty = b.tokenize([""])
    assert b.zero_empty_prompt  # model_index.json's force_zeros_for_empty_prompt
    states, added = b.unconditional(b.text_params, empty, True)
    assert not np.any(np.asarray(states)) and not np.any(np.asarray(added[:, :32]))
    np.testing.assert_array_equal(np.asarray(added[:, 32:]), [[32, 32, 0, 0, 32, 32]])  # the size stays
    negative, _ = b.unconditional(b.text_params, b.tokenize(["blurry"]), False)  # a real negative prompt is encoded
    assert np.abs(np.asarray(negative)).max() > 0.1
    encoded = load_bundle("tiny-sdxl", empty_prompt="encoded")
    states, added = encoded.unconditional(encoded.text_params, empty, True)
    np.testing.assert_array_equal(np.asarray(states), np.asarray(b.encode_text(b.text_params, empty)))
    with pytest.raises(UserError, match="empty_prompt"):
        load_bundle("tiny-sdxl", empty_prompt="none")
