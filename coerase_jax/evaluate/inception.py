"""Inception-v3 as FID uses it, in Flax: images -> 2048-d pool features.

The network of pytorch-fid's ``FIDInceptionA/C/E`` (the TensorFlow FID graph ported to PyTorch):
torchvision's Inception-v3 with average pools that do not count padding, and a max pool in the
last block's pool branch. Weights are read from a local file with pytorch-fid's key names
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...; ``fc.*`` ignored),
as ``.safetensors`` or ``.npz``. Nothing is downloaded; make the file once where torch is::

    python -c "import torch, safetensors.torch as st; \\
      st.save_file(torch.load('pt_inception-2015-12-05-6726825d.pth', weights_only=True), \\
      'inception_fid.safetensors')"

and pass ``--config.eval.inception=inception_fid.safetensors``. Input: images in [0, 1], resized
bilinearly to 299² and scaled to [-1, 1], as pytorch-fid does.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from coerase_jax.errors import UserError
from coerase_jax.models import convert

SIZE = 299
FEATURES = 2048


class BasicConv(nn.Module):
    """Conv (no bias) -> batch norm (inference, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, self.strides, padding=[(p, p) for p in self.padding],
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):  # 3x3, stride 1, padding 1, padding not counted (the FID blocks)
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_down(x):  # 3x3, stride 2, no padding
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        pool = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, pool], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        d = BasicConv(64, name="branch3x3dbl_1")(x)
        d = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(d)
        d = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(d)
        return jnp.concatenate([b3, d, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        d = BasicConv(c, name="branch7x7dbl_1")(x)
        d = BasicConv(c, **col, name="branch7x7dbl_2")(d)
        d = BasicConv(c, **row, name="branch7x7dbl_3")(d)
        d = BasicConv(c, **col, name="branch7x7dbl_4")(d)
        d = BasicConv(192, **row, name="branch7x7dbl_5")(d)
        pool = BasicConv(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, d, pool], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):
    max_pool_branch: bool  # FID's last block (E_2) pools with max, the one before (E_1) with average

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, **row, name="branch3x3_2a")(b3),
                              BasicConv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        d = BasicConv(448, name="branch3x3dbl_1")(x)
        d = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(d)
        d = jnp.concatenate([BasicConv(384, **row, name="branch3x3dbl_3a")(d),
                             BasicConv(384, **col, name="branch3x3dbl_3b")(d)], axis=-1)
        pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool_branch else _avg_pool_same(x)
        pool = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, d, pool], axis=-1)


class FIDInception(nn.Module):
    """(B, H, W, 3) images in [0, 1] -> (B, 2048) pool features."""

    @nn.compact
    def __call__(self, images):
        x = jax.image.resize(images, (images.shape[0], SIZE, SIZE, 3), "bilinear", antialias=False)
        x = x * 2.0 - 1.0
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_down(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_down(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def abstract_variables() -> dict:
    return jax.eval_shape(lambda: FIDInception().init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))


_STATS = {"mean": "running_mean", "var": "running_var"}  # batch-norm statistics: Flax -> PyTorch leaf names


def variables_from_torch(state: dict[str, np.ndarray]) -> dict:
    """pytorch-fid's state dict -> Flax variables (params + batch_stats), every tensor checked."""
    expected = abstract_variables()
    params = convert.torch_state_to_flax(state, expected["params"], "Inception weights", strict=False)
    stats = {}
    for path, leaf in traverse_util.flatten_dict(expected["batch_stats"]).items():
        key = ".".join(path[:-1] + (_STATS[path[-1]],))
        if key not in state or tuple(np.shape(state[key])) != tuple(leaf.shape):
            raise UserError(f"Inception weights: {key} is missing or not of shape {leaf.shape} "
                            f"(expected pytorch-fid's FID Inception key names)")
        stats[path] = np.asarray(state[key], np.float32)
    return {"params": params, "batch_stats": traverse_util.unflatten_dict(stats)}


def variables_to_torch(variables: dict) -> dict[str, np.ndarray]:
    """The inverse of :func:`variables_from_torch` (the file layout, e.g. for test weights)."""
    state = convert.flax_to_torch_state(variables["params"])
    for path, value in traverse_util.flatten_dict(variables["batch_stats"]).items():
        state[".".join(path[:-1] + (_STATS[path[-1]],))] = np.asarray(value)
    return state


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".safetensors":
        return convert.read_safetensors(path)
    raise UserError(f"Inception weights must be .safetensors or .npz (convert the .pth once, see "
                    f"coerase_jax/evaluate/inception.py), got {path.name}")


def load_inception(path: str | Path):
    """A jitted ``images_uint8 (B,H,W,3) -> (B, 2048) numpy`` function with the file's weights."""
    variables = jax.tree_util.tree_map(jnp.asarray, variables_from_torch(read_weights(path)))
    model = FIDInception()
    forward = jax.jit(lambda images: model.apply(variables, images))
    return lambda images: np.asarray(forward(jnp.asarray(images, jnp.float32) / 255.0))
