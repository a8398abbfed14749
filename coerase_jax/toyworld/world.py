"""The synthetic world: one coloured shape on a light canvas, and the ways captions name it.

Each shape has one *name* ("circle") and several *paraphrases* ("disc", "ball", "round dot") that
never use the name; training captions mix both, so the model learns that "a red disc" is a red
circle. Erasing the word "circle" from text alone can then miss the paraphrases, which is the gap
Co-Erasing's image stage closes.

Rendering is numpy with 4x supersampling (anti-aliased edges), seeded and fast (~20k images/s).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 32
COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (225, 195, 30)}
BACKGROUND = 240
TEMPLATES = ("a {colour} {noun}", "a picture of a {colour} {noun}", "a photo of a {colour} {noun}",
             "{colour} {noun}")
# Captions that leave the colour out ("a circle": a circle of any colour): a share of the UNet's and
# IP-Adapter's training captions (TrainPlan.colourless_fraction), and the concept prompts of erasure.
COLOURLESS_TEMPLATES = ("a {noun}", "a picture of a {noun}", "a photo of a {noun}")
_SUPERSAMPLE = 4

@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    radius: float  # half-extent in pixels
    centre: tuple[float, float]  # (x, y) in pixels


def random_scenes(rng: np.random.Generator, count: int, shapes=None, colours=COLOURS) -> list[Scene]:
    shapes = THREE_SHAPES.shapes if shapes is None else shapes
    scenes = []
    for _ in range(count):
        radius = rng.uniform(7.0, 11.0)
        margin = radius + 2.0
        centre = tuple(rng.uniform(margin, IMAGE_SIZE - margin, size=2))
        scenes.append(Scene(str(rng.choice(shapes)), str(rng.choice(colours)), radius, centre))
    return scenes


def _coverage(scene: Scene) -> np.ndarray:
    """Fraction of each pixel the shape covers, (H, W) in [0, 1]."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    cx, cy = scene.centre
    dx, dy, r = x - cx, y - cy, scene.radius
    if scene.shape == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif scene.shape == "square":
        half = 0.886 * r  # same area as the circle
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif scene.shape == "triangle":
        # upright equilateral triangle; circumradius chosen so its area matches the circle's
        big = 1.555 * r
        top, base = cy - big, cy + big / 2
        half_width = (y - top) / (base - top) * big * np.sqrt(3) / 2
        inside = (y >= top) & (y <= base) & (np.abs(dx) <= half_width)
    elif scene.shape == "diamond":  # a square on its corner, |dx| + |dy| <= h, area 2h^2
        inside = np.abs(dx) + np.abs(dy) <= 1.2533 * r
    elif scene.shape == "cross":  # a plus sign: two bars, each a third as wide as long
        arm, bar = 1.189 * r, 0.396 * r
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= bar)) | ((np.abs(dx) <= bar) & (np.abs(dy) <= arm))
    elif scene.shape == "star":  # five points up, inner radius 0.55 of the outer
        inside = _inside_star(dx, dy, outer=1.394 * r, inner=0.55 * 1.394 * r)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))


def _inside_star(dx: np.ndarray, dy: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Inside a five-pointed star: fold the angle into one half-point (0 = a tip, 36 degrees = the
    notch beside it) and test against the edge from the tip to the notch."""
    half = np.pi / 5
    angle = np.mod(np.arctan2(dx, -dy), 2 * half)
    angle = np.where(angle > half, 2 * half - angle, angle)
    dist = np.hypot(dx, dy)
    x, y = dist * np.cos(angle), dist * np.sin(angle)
    tip, notch = np.array([outer, 0.0]), np.array([inner * np.cos(half), inner * np.sin(half)])
    edge = notch - tip
    # the centre is on the inner side of the edge; a point is inside if on the same side
    side = edge[0] * (y - tip[1]) - edge[1] * (x - tip[0])
    centre_side = edge[0] * (0 - tip[1]) - edge[1] * (0 - tip[0])
    return np.sign(side) == np.sign(centre_side)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W, 3) uint8. With ``rng``, the colour is jittered a little (±12 per channel)."""
    colour = np.asarray(RGB[scene.colour], np.float32)
    if rng is not None:
        colour = np.clip(colour + rng.uniform(-12, 12, 3), 0, 255)
    alpha = _coverage(scene)[..., None]
    image = alpha * colour + (1.0 - alpha) * BACKGROUND
    return np.round(image).astype(np.uint8)


def render_many(scenes: list[Scene], rng: np.random.Generator | None = None) -> np.ndarray:
    return np.stack([render(s, rng) for s in scenes])


@dataclasses.dataclass(frozen=True)
class World:
    """A world's shapes, each named by itself and by paraphrases that never contain any shape's name;
    the colours, templates and renderer are shared by every world."""

    name: str
    shapes: tuple[str, ...]
    paraphrases: dict[str, tuple[str, ...]]

    def nouns(self, shape: str) -> tuple[str, ...]:
        return (shape,) + self.paraphrases[shape]

    def all_captions(self) -> list[tuple[str, str, str | None]]:
        """Every caption the world produces, as (caption, shape, colour or None when it names none)."""
        coloured = [(t.format(colour=c, noun=n), s, c) for s in self.shapes for c in COLOURS for n in self.nouns(s)
                    for t in TEMPLATES]
        colourless = [(t.format(noun=n), s, None) for s in self.shapes for n in self.nouns(s)
                      for t in COLOURLESS_TEMPLATES]
        return coloured + colourless

    def concept_prompts(self, shape: str) -> list[str]:
        """The shape named alone, in every colourless template: what erasing it trains on."""
        return [t.format(noun=shape) for t in COLOURLESS_TEMPLATES]

    def named_prompts(self, shape: str) -> list[str]:
        return [f"a {c} {shape}" for c in COLOURS]

    def paraphrase_prompts(self, shape: str) -> list[str]:
        return [f"a {c} {p}" for c in COLOURS for p in self.paraphrases[shape]]

    def vocabulary(self) -> list[str]:
        """The words a caption can contain (the tokenizer gets one token for each)."""
        words = set()
        for text, _, _ in self.all_captions():
            words.update(text.replace("-", " - ").split())
        return sorted(words)


# The shipped world (coerase_jax/toyworld/model).
THREE_SHAPES = World("three", ("circle", "square", "triangle"), {
    "circle": ("disc", "ball", "round dot"),
    "square": ("box", "block", "tile"),
    "triangle": ("wedge", "pyramid", "three-sided shape"),
})
# Issue #21's richer world: three more shapes, so that three can be erased while three hold.
SIX_SHAPES = World("six", THREE_SHAPES.shapes + ("cross", "star", "diamond"), {
    **THREE_SHAPES.paraphrases,
    "cross": ("plus", "plus sign", "hospital mark"),
    "star": ("pentagram", "five-pointed shape", "twinkle"),
    "diamond": ("rhombus", "lozenge", "kite"),
})
WORLDS = {w.name: w for w in (THREE_SHAPES, SIX_SHAPES)}


def of_model(folder) -> World:
    """The world a model folder was built for (its model_index.json says; the shipped one if silent)."""
    import json
    from pathlib import Path

    index = Path(folder) / "model_index.json"
    described = json.loads(index.read_text()).get("world", {}) if index.is_file() else {}
    name = described.get("name") or next((w.name for w in WORLDS.values()
                                          if list(w.shapes) == described.get("shapes")), THREE_SHAPES.name)
    return WORLDS[name]


# The shipped world's names, for the configs and tests written against it.
SHAPES, PARAPHRASES = THREE_SHAPES.shapes, THREE_SHAPES.paraphrases
NAMES = {s: s for s in SIX_SHAPES.shapes}
nouns, all_captions = THREE_SHAPES.nouns, THREE_SHAPES.all_captions
concept_prompts, named_prompts = THREE_SHAPES.concept_prompts, THREE_SHAPES.named_prompts
paraphrase_prompts, vocabulary = THREE_SHAPES.paraphrase_prompts, THREE_SHAPES.vocabulary
