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
