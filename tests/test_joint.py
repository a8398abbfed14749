"""Joint erasure: K concepts in one model, each example's prompt and reference image from the same concept."""

import numpy as np
import pytest

from coerase_jax.configuration import load_config
from coerase_jax.erase.trainer import ConceptData, joint_concepts, sample_batch
from coerase_jax.errors import UserError


def _data(per_step: bool) -> ConceptData:
    prompt_concept = np.asarray([0, 0, 1, 1, 1, 2])
    image_concept = np.asarray([0, 0, 0, 1, 1, 2, 2, 2])
    # every prompt state / image embedding carries its own index, so the draw can be read back
    prompts = np.arange(len(prompt_concept), dtype=np.float32)[:, None, None] * np.ones((1, 3, 2), np.float32)
    images = np.arange(len(image_concept), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    return ConceptData(prompts, np.zeros((3, 2), np.float32), prompts, np.ones((6, 3), bool), images,
                       prompt_concept, image_concept, per_step)


@pytest.mark.parametrize("per_step", [False, True])
def test_each_example_pairs_a_prompt_and_an_image_of_one_concept(per_step):
    data = _data(per_step)
    seen, mixed_batches = set(), 0
    for step in range(200):
        batch = sample_batch(data, seed=3, stage=1, step=step, batch_size=4)
        p = batch.text[:, 0, 0].astype(int)
        i = batch.image_embeds[:, 0].astype(int)
        assert (data.prompt_concept[p] == data.image_concept[i]).all()
        concepts = data.prompt_concept[p]
        mixed_batches += len(set(concepts)) > 1
        seen |= set(zip(p.tolist(), i.tolist()))
    assert (mixed_batches == 0) if per_step else (mixed_batches > 100)
    # every prompt and every image of every concept gets drawn
    assert {p for p, _ in seen} == set(range(6)) and {i for _, i in seen} == set(range(8))
    again = sample_batch(data, seed=3, stage=1, step=7, batch_size=4)  # (seed, stage, step) alone decide the batch
    np.testing.assert_array_equal(again.text, sample_batch(data, 3, 1, 7, 4).text)


def test_joint_config_is_checked():
    config = load_config("configs/joint_toyworld.py")
    assert [name for name, _ in joint_concepts(config)] == ["circle", "square"]
    for bad in ([("circle", ())], [("circle", "a red circle")], [("a/b", ("x",))], [("c", ("x",)), ("c", ("y",))]):
        with config.unlocked():
            config.concept.joint = tuple(bad)
        with pytest.raises(UserError, match="concept.joint"):
            joint_concepts(config)
