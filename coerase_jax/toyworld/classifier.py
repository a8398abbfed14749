"""The small world's judge: a CNN that says which shape (or none) and which colour an image shows.

It is the evaluation model of the small world (what NudeNet or a CLIP zero-shot classifier is at
real scale). Stored beside the bundle as ``evaluator/classifier.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from coerase_jax.errors import UserError
from coerase_jax.models import convert
from coerase_jax.toyworld import world

NONE = "none"  # an empty canvas or a shapeless smear, always the last shape class
SHAPE_CLASSES = world.SHAPES + (NONE,)  # the shipped world's
COLOUR_CLASSES = world.COLOURS
FOLDER = "evaluator"
# A "clean picture of this world": the judge is this sure of one real shape and of one colour.
# Fresh renders pass 100 %, uniform noise 0 %, smooth random colour fields ~15 % (tests/test_toyworld.py).
COHERENCE_THRESHOLD = 0.9


class ShapeClassifier(nn.Module):
    """(B, 32, 32, 3) images in [0, 1] -> (shape logits (B, S+1), colour logits (B, C))."""

    width: int = 32
    shape_classes: int = len(SHAPE_CLASSES)  # the world's shapes and "none"

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images * 2.0 - 1.0
        for i, (features, stride) in enumerate([(self.width, 1), (self.width, 2), (2 * self.width, 2),
                                                (2 * self.width, 2)]):
            x = nn.gelu(nn.Conv(features, (3, 3), strides=stride, name=f"conv{i}")(x))
        x = nn.gelu(nn.Dense(4 * self.width, name="hidden")(x.reshape(x.shape[0], -1)))
        return (nn.Dense(self.shape_classes, name="shape")(x), nn.Dense(len(COLOUR_CLASSES), name="colour")(x))

    def init_params(self, rng: jax.Array) -> dict:
        return self.init(rng, jnp.zeros((1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)))["params"]


def shape_classes(of_world: world.World) -> tuple[str, ...]:
    return of_world.shapes + (NONE,)


def save(params: dict, folder: Path, width: int, of_world: world.World) -> None:
    flat = {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    convert.write_safetensors(folder / FOLDER / "classifier.safetensors", flat)
    convert.write_json(folder / FOLDER / "config.json", {"width": width, "shapes": list(shape_classes(of_world)),
                                                          "colours": list(COLOUR_CLASSES)})


class Judge:
    """A loaded classifier: ``judge(images_uint8)`` -> (shape names, colour names)."""

    def __init__(self, folder: str | Path):
        root = Path(folder) / FOLDER
        if not (root / "classifier.safetensors").is_file():
            raise UserError(f"{folder}: no shape classifier ({root / 'classifier.safetensors'})")
        config = json.loads((root / "config.json").read_text())
        self.world = world.of_model(folder)
        self.shape_classes = shape_classes(self.world)
        if tuple(config["shapes"]) != self.shape_classes or tuple(config["colours"]) != COLOUR_CLASSES:
            raise UserError(f"{root}: classifier classes {config['shapes']}/{config['colours']} differ from the "
                            f"world's {list(self.shape_classes)}/{list(COLOUR_CLASSES)}")
        flat = convert.read_safetensors(root / "classifier.safetensors")
        self.params = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
        self.model = ShapeClassifier(config["width"], len(self.shape_classes))
        self._predict = jax.jit(lambda p, x: tuple(jax.nn.softmax(l, -1) for l in self.model.apply({"params": p}, x)))

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(shape probabilities (N, S+1), colour probabilities (N, C)) of uint8 images."""
        shapes, colours = [np.zeros((0, len(self.shape_classes)))], [np.zeros((0, len(COLOUR_CLASSES)))]
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start:start + batch_size], np.float32) / 255.0
            s, c = self._predict(self.params, chunk)
            shapes.append(np.asarray(s))
            colours.append(np.asarray(c))
        return np.concatenate(shapes), np.concatenate(colours)

    def __call__(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(shape names, colour names): the most likely of each."""
        return self.names(*self.probabilities(images, batch_size))

    def names(self, shape_probs: np.ndarray, colour_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return names(shape_probs, colour_probs, self.shape_classes)


def names(shape_probs: np.ndarray, colour_probs: np.ndarray,
          shape_classes: tuple[str, ...] = SHAPE_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(shape_classes, object)[shape_probs.argmax(-1)],
            np.asarray(COLOUR_CLASSES, object)[colour_probs.argmax(-1)])


def coherent(shape_probs: np.ndarray, colour_probs: np.ndarray, threshold: float = COHERENCE_THRESHOLD) -> np.ndarray:
    """Whether each image is a clean picture of this world: one real shape (not "none") and one
    colour, each with the judge's probability at least ``threshold``. An erased prompt may yield
    another clean picture (coherent) or a texture or smear (not)."""
    real = shape_probs.argmax(-1) != shape_probs.shape[-1] - 1  # (NONE is the last class)
    return real & (shape_probs.max(-1) >= threshold) & (colour_probs.max(-1) >= threshold)
