"""Usability metrics: the Fréchet distance against hand computations and its behaviour on the small
world's features; CLIP score ranks matched image–caption pairs above mismatched ones."""

import numpy as np
import pytest
import scipy.linalg

from coerase_jax.errors import UserError
from coerase_jax.evaluate.frechet import feature_statistics, frechet_between, frechet_distance


def test_frechet_distance_matches_hand_computations():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    got = frechet_distance([0.0, 1.0], np.diag([4.0, 9.0]), [3.0, -3.0], np.diag([1.0, 16.0]))
    assert got == pytest.approx(9.0 + 16.0 + (2 - 1) ** 2 + (3 - 4) ** 2)
    # full covariances, against scipy's general matrix square root of sigma1 @ sigma2
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    with pytest.raises(UserError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


@pytest.fixture(scope="module")
def world_bundle():
    from coerase_jax.models.bundle import load_bundle

    return load_bundle("toyworld")


@pytest.fixture(scope="module")
def renders():
    from coerase_jax.toyworld.train import make_renders

    return make_renders(256, seed=123)


def test_fid_of_a_set_with_itself_is_zero_and_rises_with_noise(world_bundle, renders):
    """Features: the small world's CLIP vision tower (no Inception network ships with the project)."""
    import jax

    embed = jax.jit(world_bundle.encode_images)
    features = lambda images: np.asarray(embed(np.asarray(images, np.float32) / 255.0))
    clean = features(renders.images)
    itself = frechet_between(clean, clean)  # zero up to eigenvalue round-off
    rng = np.random.default_rng(0)
    noisy = [frechet_between(clean, features(np.clip(renders.images + rng.normal(0, sigma, renders.images.shape),
                                                     0, 255)))
             for sigma in (8.0, 24.0, 64.0)]
    assert abs(itself) < 1e-3 * noisy[0] and 0 < noisy[0] < noisy[1] < noisy[2]


def test_clip_score_ranks_matched_captions_above_mismatched(world_bundle, renders):
    from coerase_jax.evaluate.clip_score import ClipScorer
    from coerase_jax.models import presets
    from coerase_jax.toyworld import world

    scorer = ClipScorer(world_bundle, presets.TOYWORLD_DIR / "evaluator" / "clip_text")
    shapes = [world.SHAPES[s] for s in renders.shape]
    colours = [world.COLOURS[c] for c in renders.colour]
    matched = [f"a {c} {world.NAMES[s]}" for s, c in zip(shapes, colours)]
    other_shape = [f"a {c} {world.NAMES[world.SHAPES[(world.SHAPES.index(s) + 1) % len(world.SHAPES)]]}"
                   for s, c in zip(shapes, colours)]
    other_colour = [f"a {world.COLOURS[(world.COLOURS.index(c) + 1) % len(world.COLOURS)]} {world.NAMES[s]}"
                    for s, c in zip(shapes, colours)]
    right = scorer(renders.images, matched)
    for wrong in (scorer(renders.images, other_shape), scorer(renders.images, other_colour)):
        assert right.mean() > wrong.mean() + 0.1
        assert np.mean(right > wrong) >= 0.9
