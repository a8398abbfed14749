"""The Flax FID Inception: torchvision's architecture (parameter count), pytorch-fid's file layout
(loader round trip, kernel orientation checked by hand), FID's padding-free average pools."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from coerase_jax.errors import UserError
from coerase_jax.evaluate import inception
from tolerance import assert_same_maths


def test_architecture_has_torchvisions_inception_v3_parameter_count():
    variables = inception.abstract_variables()
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    # torchvision's inception_v3: 27,161,264 parameters, of which the 1000-way fc has 2,049,000 and
    # the auxiliary classifier 3,326,696 (FID uses neither)
    assert count == 27_161_264 - 2_049_000 - 3_326_696
    out = jax.eval_shape(inception.FIDInception().apply, variables, jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, inception.FEATURES)


def test_average_pools_do_not_count_padding():
    ones = jnp.ones((1, 5, 5, 2))
    np.testing.assert_allclose(inception._avg_pool_same(ones), 1.0)  # corners would be 4/9 if they did


def _random_torch_state(seed=0):
    rng = np.random.default_rng(seed)
    abstract = traverse_util.flatten_dict(inception.abstract_variables())
    variables = traverse_util.unflatten_dict(
        {k: (rng.uniform(0.5, 1.5, v.shape) if k[-1] == "var" else rng.normal(0, 0.1, v.shape)).astype(np.float32)
         for k, v in abstract.items()})
    return inception.variables_to_torch(variables)


def test_first_layer_from_the_file_layout_matches_a_hand_computation():
    state = _random_torch_state()
    variables = inception.variables_from_torch(state)
    layer = inception.BasicConv(32, (3, 3), strides=2)
    sub = {c: variables[c]["Conv2d_1a_3x3"] for c in ("params", "batch_stats")}
    x = np.random.default_rng(1).normal(size=(1, 7, 7, 3)).astype(np.float32)
    got = np.asarray(layer.apply(sub, x))
    w = state["Conv2d_1a_3x3.conv.weight"]  # (out, in, kh, kw), PyTorch's layout
    conv = np.zeros((1, 3, 3, 32), np.float32)
    for i in range(3):
        for j in range(3):
            patch = x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # (kh, kw, in)
            conv[0, i, j] = np.einsum("hwc,ochw->o", patch, w)
    bn = {k: state[f"Conv2d_1a_3x3.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    expected = np.maximum((conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"], 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_loader_refuses_other_files(tmp_path):
    state = _random_torch_state()
    del state["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(UserError, match="Mixed_7c.branch_pool.bn.running_var"):
        inception.variables_from_torch(state)
    state = _random_torch_state()
    state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:10]
    with pytest.raises(UserError, match="Mixed_5b.branch1x1.conv.weight"):
        inception.variables_from_torch(state)
    with pytest.raises(UserError, match=".safetensors or .npz"):
        inception.read_weights((tmp_path / "w.pth").write_bytes(b"x") and tmp_path / "w.pth")


@pytest.mark.cross_program
@pytest.mark.slow
def test_a_weight_file_loads_and_gives_the_networks_features(tmp_path):
    from coerase_jax.models import convert

    state = _random_torch_state()
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)  # pytorch-fid's file has the classifier too
    convert.write_safetensors(tmp_path / "inception.safetensors", state)
    features = inception.load_inception(tmp_path / "inception.safetensors")
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    direct = inception.FIDInception().apply(inception.variables_from_torch(state),
                                            jnp.asarray(images, jnp.float32) / 255.0)
    # two programs: about 50 convolutions on Inception-v3's longest path, each a sum of up to ~2,000 terms
    assert_same_maths(features(images), direct, 50 * 2000)
    assert features(images).shape == (2, 2048)
