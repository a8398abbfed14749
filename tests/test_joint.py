"""Joint erasure: K concepts in one model, each example's prompt and reference image from the same concept."""

import numpy as np
import pytest

from coerase_jax.configuration import load_config
from coerase_jax.erase.trainer import ConceptData, joint_concepts, plan_stages, sample_batch, shared_turns
from coerase_jax.errors import UserError


def _data(sampling: str) -> ConceptData:
    prompt_concept = np.asarray([0, 0, 1, 1, 1, 2])
    image_concept = np.asarray([0, 0, 0, 1, 1, 2, 2, 2])
    # every prompt state / image embedding carries its own index, so the draw can be read back
    prompts = np.arange(len(prompt_concept), dtype=np.float32)[:, None, None] * np.ones((1, 3, 2), np.float32)
    images = np.arange(len(image_concept), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    return ConceptData(prompts, np.zeros((3, 2), np.float32), prompts, np.ones((6, 3), bool), images,
                       prompt_concept, image_concept, sampling)


@pytest.mark.parametrize("sampling", ["per_example", "per_step", "balanced"])
def test_each_example_pairs_a_prompt_and_an_image_of_one_concept(sampling):
    data = _data(sampling)
    seen, mixed_batches, per_concept = set(), 0, np.zeros(3, int)
    for step in range(200):
        batch = sample_batch(data, seed=3, stage=1, step=step, batch_size=4)
        p = batch.text[:, 0, 0].astype(int)
        i = batch.image_embeds[:, 0].astype(int)
        assert (data.prompt_concept[p] == data.image_concept[i]).all()
        concepts = data.prompt_concept[p]
        mixed_batches += len(set(concepts)) > 1
        per_concept += np.bincount(concepts, minlength=3)
        seen |= set(zip(p.tolist(), i.tolist()))
        if sampling == "balanced" and step % 3 == 2:  # 3 steps of 4 examples: each of the 3 concepts 4 times
            assert (per_concept == per_concept[0]).all(), per_concept
    assert (mixed_batches == 0) if sampling == "per_step" else (mixed_batches > 100)
    if sampling == "per_example":  # independent draws: shares near 1/3, not forced equal
        assert 200 < per_concept.min() and per_concept.max() < 340 and len(set(per_concept)) > 1
    # every prompt and every image of every concept gets drawn
    assert {p for p, _ in seen} == set(range(6)) and {i for _, i in seen} == set(range(8))
    again = sample_batch(data, seed=3, stage=1, step=7, batch_size=4)  # (seed, stage, step) alone decide the batch
    np.testing.assert_array_equal(again.text, sample_batch(data, 3, 1, 7, 4).text)


@pytest.mark.parametrize("sampling", ["per_example", "per_step", "balanced"])
def test_shares_give_each_concept_its_part_of_the_examples(sampling):
    data = _data(sampling)
    data.joint_shares = (2, 1, 1)  # the first concept: half the examples
    per_concept = np.zeros(3, int)
    for step in range(300):
        batch = sample_batch(data, seed=5, stage=0, step=step, batch_size=2)
        per_concept += np.bincount(data.prompt_concept[batch.text[:, 0, 0].astype(int)], minlength=3)
        if sampling == "balanced" and step % 2 == 1:  # every 4 examples: 2, 1, 1 exactly
            assert list(per_concept) == [(step + 1), (step + 1) // 2, (step + 1) // 2], per_concept
    # drawn shares: 300 (per_step) to 600 draws of p = 1/2, 1/4, 1/4; +-0.1 is over 3 standard deviations
    np.testing.assert_allclose(per_concept / per_concept.sum(), [0.5, 0.25, 0.25], atol=0.1)
    assert list(shared_turns((1, 1, 1))) == [0, 1, 2]  # equal shares: the plain turns
    assert list(shared_turns((1, 3))) == [1, 0, 1, 1]


def test_joint_config_is_checked():
    config = load_config("configs/joint_toyworld.py")
    assert [name for name, _ in joint_concepts(config)] == ["circle", "square", "triangle"]
    for bad in ([("circle", ())], [("circle", "a red circle")], [("a/b", ("x",))], [("c", ("x",)), ("c", ("y",))]):
        with config.unlocked():
            config.concept.joint = tuple(bad)
        with pytest.raises(UserError, match="concept.joint"):
            joint_concepts(config)
    with config.unlocked():
        config.concept.joint = (("circle", ("a circle",)),)
        config.concept.joint_sampling = "round_robin"
    with pytest.raises(UserError, match="joint_sampling must be one of per_example, per_step, balanced"):
        joint_concepts(config)
    with config.unlocked():
        config.concept.joint_sampling = "balanced"
    for bad in ((2, 1), (1, 0), (1.5,)):
        with config.unlocked():
            config.concept.joint_shares = bad
        with pytest.raises(UserError, match="joint_shares must be one whole number > 0 per concept.joint entry"):
            joint_concepts(config)


def test_joint_steps_and_learning_rate_scale_with_the_number_of_concepts():
    config = load_config("configs/joint_toyworld.py", ["--config.text_stage.steps=100",
                                                       "--config.image_stage.steps=30",
                                                       "--config.text_stage.learning_rate=1e-4",
                                                       "--config.image_stage.learning_rate=3e-4"])
    single = {s.name: (s.steps, s.learning_rate) for s in plan_stages(config)}
    assert single == {"text": (100, 1e-4), "image": (30, 3e-4)}  # exponents 0: as one erasure
    with config.unlocked():
        config.concept.joint = config.concept.joint + (("cross", ("a cross",)),)  # K = 4
        config.concept.joint_steps_exponent, config.concept.joint_lr_exponent = 1.0, -0.5
    scaled = {s.name: (s.steps, s.learning_rate) for s in plan_stages(config)}
    assert scaled["text"][0] == 400 and scaled["image"][0] == 120
    assert scaled["text"][1] == pytest.approx(1e-4 / 2) and scaled["image"][1] == pytest.approx(3e-4 / 2)
    with config.unlocked():
        config.concept.joint = ()  # a single erasure ignores the exponents
    assert {s.name: (s.steps, s.learning_rate) for s in plan_stages(config)} == single
