"""The method's equations against hand computations (DESIGN.md section 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coerase_jax.erase import method
from coerase_jax.erase.step import StepSettings, teacher_terms


def test_refinement_rows_are_convex_combinations_of_text_states():
    # One image token, two text tokens, D = 2: scores q.c / sqrt(2) by hand.
    q = jnp.array([[[1.0, 0.0]]])
    c = jnp.array([[[2.0, 0.0], [0.0, 4.0]]])
    got = np.asarray(method.refine_image_tokens(q, c))
    scores = np.array([2.0, 0.0]) / np.sqrt(2.0)
    w = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(got[0, 0], w[0] * np.array([2.0, 0.0]) + w[1] * np.array([0.0, 4.0]), rtol=1e-6)

    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 77, 8))
    out = np.asarray(method.refine_image_tokens(jnp.asarray(q), jnp.asarray(c)))
    for b in range(3):
        scores = q[b] @ c[b].T / np.sqrt(8)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)  # rows: non-negative, summing to one
        np.testing.assert_allclose(out[b], weights @ c[b], rtol=1e-5, atol=1e-6)
        assert np.all(out[b] >= c[b].min(axis=0) - 1e-5) and np.all(out[b] <= c[b].max(axis=0) + 1e-5)


def test_refinement_mask_keeps_padding_out():
    q = jnp.ones((1, 4, 2))
    c = jnp.array([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    mask = jnp.array([[True, True, False]])
    out = np.asarray(method.refine_image_tokens(q, c, mask))
    assert np.all(out <= 2.0 + 1e-6)  # the masked third token (100) takes no part
    ids = jnp.array([[49406, 320, 49407, 49407, 49407]])
    np.testing.assert_array_equal(np.asarray(method.real_token_mask(ids, 49407)), [[1, 1, 1, 0, 0]])


def test_negative_guidance_target_formula():
    eps_u = jnp.array([1.0, -2.0, 0.5])
    eps_c = jnp.array([3.0, 1.0, 0.5])
    np.testing.assert_allclose(method.negative_guidance_target(eps_u, eps_c, 1.0), [-1.0, -5.0, 0.5])
    np.testing.assert_allclose(method.negative_guidance_target(eps_u, eps_c, 0.5), [0.0, -3.5, 0.5])
    np.testing.assert_allclose(method.erasure_loss(jnp.array([1.0, 1.0]), jnp.array([0.0, 3.0])), 2.5)


def test_loss_gradient_does_not_flow_into_the_target():
    grad = jax.grad(lambda x: method.erasure_loss(x, 2.0 * x))(jnp.array([1.0]))
    np.testing.assert_allclose(grad, [2.0 * (1.0 - 2.0)])  # d/dx (x - sg(2x))^2 = 2(x - 2x)


def _toy_eps(params, x, t, text, image_tokens=None, image_scale=1.0):
    out = x * params + text.mean(axis=(1, 2))[:, None, None, None]
    if image_tokens is not None:
        scale = jnp.asarray(image_scale).reshape(-1, 1, 1, 1) if jnp.ndim(image_scale) else image_scale
        out = out + scale * image_tokens.mean(axis=(1, 2))[:, None, None, None]
    return out


def test_text_uncond_changes_exactly_the_unconditional_term():
    z = jnp.ones((2, 1, 2, 2))
    t = jnp.array([5, 5])
    text, uncond = jnp.full((2, 3, 4), 2.0), jnp.zeros((2, 3, 4))
    tokens = jnp.full((2, 4, 4), 0.5)
    cond_a, uncond_a = teacher_terms(_toy_eps, 1.0, z, t, text, uncond, tokens, StepSettings(True, text_uncond=True))
    cond_b, uncond_b = teacher_terms(_toy_eps, 1.0, z, t, text, uncond, tokens, StepSettings(True, text_uncond=False))
    np.testing.assert_array_equal(np.asarray(cond_a), np.asarray(cond_b))
    np.testing.assert_allclose(np.asarray(cond_a), 1.0 + 2.0 + 0.5)
    np.testing.assert_allclose(np.asarray(uncond_a), 1.0)  # text-only: no image tokens
    np.testing.assert_allclose(np.asarray(uncond_b), 1.0 + 0.5)  # the image tokens too


def test_contrastive_embeddings():
    pos, neg = jnp.array([3.0, 1.0]), jnp.array([1.0, 2.0])
    np.testing.assert_allclose(method.contrastive_embedding(pos, neg, "diff"), [2.0, -1.0])
    np.testing.assert_allclose(method.contrastive_embedding(pos, neg, "l1"), [2.0, 1.0])
    np.testing.assert_allclose(method.contrastive_embedding(pos, neg, "l2"), [4.0, 1.0])
    with pytest.raises(ValueError):
        method.contrastive_embedding(pos, neg, "cosine")


def test_gaussian_blur_matches_a_hand_convolution():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    sigma = method.default_blur_sigma(3)
    assert np.isclose(sigma, 0.8)
    k = np.exp(-0.5 * (np.arange(-1, 2) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    expected = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            expected += k[i] * k[j] * padded[:, :, i:i + 6, j:j + 6]
    np.testing.assert_allclose(np.asarray(method.gaussian_blur(jnp.asarray(x), 3, sigma)), expected, rtol=1e-5,
                               atol=1e-6)
    constant = jnp.full((1, 1, 5, 5), 2.0)
    np.testing.assert_allclose(np.asarray(method.gaussian_blur(constant, 5, 1.1)), 2.0, rtol=1e-6)


def test_bin_timestep_stays_in_its_bin():
    for index in (0, 7, 49):
        t = np.asarray(method.bin_timestep(jax.random.PRNGKey(index), jnp.int32(index), 50, 64, 1000))
        assert t.min() >= index * 20 and t.max() < (index + 1) * 20
