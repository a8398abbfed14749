"""The small world: rendering, captions and tokenizer; the shipped model's quality; the build chain;
and the main job — erasing "circle" erases circles (named and paraphrased) while the others hold."""

import json

import numpy as np
import pytest

from coerase_jax.models.clip import load_tokenizer
from coerase_jax.toyworld import world
from coerase_jax.toyworld.tokenizer import write_world_tokenizer


def test_shapes_have_the_intended_geometry():
    rng = np.random.default_rng(0)
    for shape in world.SHAPES:
        scene = world.Scene(shape, "red", 9.0, (16.0, 16.0))
        image = world.render(scene).astype(float)
        covered = (world.BACKGROUND - image[..., 1]) / (world.BACKGROUND - world.RGB["red"][1])
        # every shape covers about the area of a radius-9 disc (sizes are not a shape cue)
        assert abs(covered.sum() - np.pi * 81) / (np.pi * 81) < 0.03, shape
        assert np.allclose(image[16, 16], world.RGB["red"], atol=1)
    square = world.render(world.Scene("square", "blue", 11.0, (16.0, 16.0)))
    circle = world.render(world.Scene("circle", "blue", 11.0, (16.0, 16.0)))
    triangle = world.render(world.Scene("triangle", "blue", 11.0, (16.0, 16.0)))
    corner = (7, 7)  # inside the square (half side 9.75), outside the disc (radius 11)
    assert square[corner].tolist() == list(world.RGB["blue"]) and circle[corner].tolist() == [world.BACKGROUND] * 3
    assert triangle[8, 16].tolist() == list(world.RGB["blue"])  # the apex column, near the top
    assert triangle[8, 9].tolist() == [world.BACKGROUND] * 3  # beside the apex: a triangle, not a box
    assert len(world.random_scenes(rng, 5)) == 5


def test_paraphrases_never_name_the_shape():
    for shape in world.SHAPES:
        for prompt in world.paraphrase_prompts(shape):
            assert not any(world.NAMES[s] in prompt for s in world.SHAPES), prompt
        assert all(world.NAMES[shape] in p for p in world.named_prompts(shape))
    captions = [c for c, _, _ in world.all_captions()]
    assert "a red disc" in captions and "a photo of a green three-sided shape" in captions


def test_every_world_word_is_one_clip_token(tmp_path):
    vocab_size = write_world_tokenizer(tmp_path, world.vocabulary())
    tokenizer = load_tokenizer(str(tmp_path))
    for word in world.vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word
    assert len(tokenizer.tokenize("zebra")) > 1  # other words still tokenize, as bytes
    ids = json.loads((tmp_path / "vocab.json").read_text()).values()
    assert tokenizer.eos_token_id == max(ids) == vocab_size - 1
