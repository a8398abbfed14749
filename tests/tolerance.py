"""How far apart two computations of the same maths may land, derived from their arithmetic.

Two differently compiled programs (another fusion, vector width, CPU model or device split; an
eager reference beside a jitted loop) round their operations differently. A rounding moves a value
by at most one unit roundoff u of its size (float32: 2^-24, bfloat16: 2^-8). Following Higham &
Mary's probabilistic rounding-error analysis, n independent roundings on the way to a value move it
by at most lambda * sqrt(n) * u of the magnitudes involved, except with probability below
2 exp(-lambda^2 / 2); lambda = 6 makes that 3e-8 per value. n counts every rounding on the way: a
length-K dot product, convolution or normalisation sum contributes K, an elementwise op one.

A test that compares two sides which run the *same* program does not use this: those must be
exact (``assert_array_equal``).
"""

from __future__ import annotations

import math

import numpy as np

F32 = 2.0 ** -24  # float32 unit roundoff
BF16 = 2.0 ** -8  # bfloat16 unit roundoff
LAMBDA = 6.0


def tolerance(roundings: float, scale: float, unit: float = F32) -> float:
    """The largest difference ``roundings`` roundings of relative size ``unit`` on values of size
    ``scale`` can make between two orderings of the same arithmetic."""
    return LAMBDA * math.sqrt(roundings) * unit * scale


def assert_same_maths(actual, expected, roundings: float, unit: float = F32, scale: float | None = None,
                      err_msg: str = "") -> None:
    """``actual`` equals ``expected`` up to ``tolerance(roundings, scale)``; the scale defaults to the
    largest magnitude in ``expected`` (the size of the values the roundings acted on)."""
    expected = np.asarray(expected, np.float64)
    if scale is None:
        scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0,
                               atol=tolerance(roundings, scale, unit), err_msg=err_msg)


def assert_same_training(actual: list, expected: list, start: list, roundings: float, err_msg: str = "") -> None:
    """Parameter leaves trained by two programs from the same ``start``. An update is a sum of
    gradient terms as large as the largest update anywhere (a bias whose true gradient is zero gets
    only their cancelling rounding noise), so every leaf may differ by ``roundings`` roundings at that
    scale, plus the rounding of parameter + update at the leaf's own size."""
    assert len(actual) == len(expected) == len(start)
    updates = [np.asarray(e, np.float64) - np.asarray(s, np.float64) for e, s in zip(expected, start)]
    largest_update = max(float(np.abs(u).max()) for u in updates)
    for i, (a, e) in enumerate(zip(actual, expected)):
        e = np.asarray(e, np.float64)
        atol = tolerance(roundings, largest_update) + tolerance(1, float(np.abs(e).max()))
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=0, atol=atol, err_msg=f"{err_msg} leaf {i}")


def unet_forward_roundings(config, tokens: int = 77) -> int:
    """Roundings on the way to one output value of a UNet forward (a ``UNetConfig``): every layer on
    the path adds its reduction length — a 3x3 conv over C channels 9C, a dense layer its input
    width, a GroupNorm its group, attention the head width and then the keys — plus a few
    elementwise ops."""
    groups = config.norm_num_groups
    heads = config.heads
    side = config.sample_size
    channels = config.block_out_channels

    def resnet(c_in, c, hw):
        return 2 * (c_in // groups) * hw + 9 * c_in + 9 * c + c_in + 8

    def transformer(c, hw, n_heads):
        d = c // n_heads
        attention = lambda keys: d + keys + c
        return (c // groups) * hw + c + attention(hw) + attention(tokens) + c + 4 * c + c + 16

    total = 9 * config.in_channels
    depth = list(config.per_block(config.transformer_layers_per_block))
    for b, kind in enumerate(config.down_block_types):
        hw = (side >> b) ** 2
        for i in range(config.layers_per_block):
            total += resnet(channels[b - 1] if (i == 0 and b) else channels[b], channels[b], hw)
            if kind.startswith("CrossAttn"):
                total += depth[b] * transformer(channels[b], hw, heads[b])
        total += 9 * channels[b]  # the downsampler
    low = (side >> (len(channels) - 1)) ** 2
    total += 2 * resnet(channels[-1], channels[-1], low) + depth[-1] * transformer(channels[-1], low, heads[-1])
    for b, kind in enumerate(config.up_block_types):
        r = len(channels) - 1 - b
        hw = (side >> r) ** 2
        for _ in range(config.layers_per_block + 1):
            total += resnet(2 * channels[r], channels[r], hw)
            if kind.startswith("CrossAttn"):
                total += depth[r] * transformer(channels[r], hw, heads[r])
        total += 9 * channels[r]  # the upsampler
    return total + (channels[0] // groups) * side ** 2 + 9 * channels[0]


def erasure_step_roundings(config, ddim_steps: int, batch: int) -> int:
    """Roundings on the way to a result of one erasure step: ``ddim_steps`` UNet forwards to reach
    z_t, the teacher's two branches, the trainee's forward and backward (about three forwards), and
    the loss's mean over the batch's latents."""
    latents = batch * config.in_channels * config.sample_size ** 2
    return (ddim_steps + 5) * (unet_forward_roundings(config) + 8) + latents
