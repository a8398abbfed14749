"""The small world: rendering, captions and tokenizer; the shipped model's quality; the build chain;
and the main job — erasing "circle" erases circles (named and paraphrased) while the others hold."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from coerase_jax.errors import UserError
from coerase_jax.models.clip import load_tokenizer
from coerase_jax.toyworld import world
from coerase_jax.toyworld.tokenizer import write_world_tokenizer
from tolerance import assert_same_maths


def test_shapes_have_the_intended_geometry():
    rng = np.random.default_rng(0)
    for shape in world.SIX_SHAPES.shapes:
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
    inside = lambda shape, at: world.render(world.Scene(shape, "blue", 10.0, (16.0, 16.0)))[at].tolist() == \
        list(world.RGB["blue"])
    # the plus sign: its arms' ends are in, the corners between them out; the diamond the other way round
    assert inside("cross", (16, 4)) and inside("cross", (4, 16)) and not inside("cross", (10, 10))
    assert inside("diamond", (16, 5)) and not inside("diamond", (7, 7))
    # the star: its top point is in; 36 degrees round (by the notch), as far out, is not
    assert inside("star", (7, 16)) and not inside("star", (7, 22))
    assert {s.shape for s in world.random_scenes(rng, 200, world.SIX_SHAPES.shapes)} == set(world.SIX_SHAPES.shapes)


@pytest.mark.parametrize("of_world", world.WORLDS.values(), ids=world.WORLDS)
def test_paraphrases_never_name_the_shape(of_world):
    for shape in of_world.shapes:
        assert len(of_world.paraphrases[shape]) >= 3
        for prompt in of_world.paraphrase_prompts(shape):
            assert not any(s in prompt for s in of_world.shapes), prompt
        assert all(shape in p for p in of_world.named_prompts(shape))
    captions = [c for c, _, _ in of_world.all_captions()]
    assert "a red disc" in captions and "a photo of a green three-sided shape" in captions


def test_the_six_shape_world_extends_the_shipped_one_and_models_say_their_world(tmp_path):
    assert world.SIX_SHAPES.shapes[:3] == world.SHAPES and len(world.SIX_SHAPES.shapes) == 6
    assert set(world.vocabulary()) < set(world.SIX_SHAPES.vocabulary())
    assert world.vocabulary() == world.THREE_SHAPES.vocabulary()  # (the shipped tokenizer's words)
    from coerase_jax.models import presets

    assert world.of_model(presets.source_folder("toyworld")) is world.THREE_SHAPES  # (no name: by its shapes)
    (tmp_path / "model_index.json").write_text(json.dumps({"world": {"name": "six"}}))
    assert world.of_model(tmp_path) is world.SIX_SHAPES


@pytest.mark.parametrize("of_world", world.WORLDS.values(), ids=world.WORLDS)
def test_every_world_word_is_one_clip_token(tmp_path, of_world):
    vocab_size = write_world_tokenizer(tmp_path, of_world.vocabulary())
    tokenizer = load_tokenizer(str(tmp_path))
    for word in of_world.vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word
    assert len(tokenizer.tokenize("zebra")) > 1  # other words still tokenize, as bytes
    ids = json.loads((tmp_path / "vocab.json").read_text()).values()
    assert tokenizer.eos_token_id == max(ids) == vocab_size - 1


# ---------------------------------------------------------------- the shipped model

@pytest.fixture(scope="module", params=["toyworld", "toyworld-six"])
def shipped(request):
    """(bundle, judge, world) of each shipped small world."""
    from coerase_jax.models.bundle import load_bundle
    from coerase_jax.models.presets import SHIPPED_WORLDS
    from coerase_jax.toyworld.classifier import Judge

    judge = Judge(SHIPPED_WORLDS[request.param][0])
    return load_bundle(request.param), judge, judge.world


def test_judge_is_right_on_fresh_ground_truth_renders(shipped):
    _, judge, of_world = shipped
    rng = np.random.default_rng(2024)  # not the training renders' seed
    scenes = world.random_scenes(rng, 600, of_world.shapes)
    shapes, colours = judge(world.render_many(scenes, rng))
    accuracy = np.mean([(s == sc.shape) and (c == sc.colour) for s, c, sc in zip(shapes, colours, scenes)])
    assert accuracy >= 0.98
    empty = np.full((8, 32, 32, 3), world.BACKGROUND, np.uint8)
    assert list(judge(empty)[0]) == ["none"] * 8


def test_shipped_model_draws_the_shape_and_colour_it_is_asked_for(shipped):
    """`coerase toyworld check`'s figures (#21: every shape drawn right >= 90 % of the time)."""
    import ml_collections

    from coerase_jax.toyworld.report import world_quality

    bundle, _, of_world = shipped
    per_shape = 8 * len(world.COLOURS)
    settings = ml_collections.ConfigDict({"steps": 25, "guidance_scale": 3.0, "split": "dev"})
    quality = world_quality(bundle, settings, per_shape, progress=False)
    assert quality["draws_all"]["n"] == per_shape * len(of_world.shapes)
    assert quality["draws_all"]["rate"] >= 0.9
    for shape in of_world.shapes:  # and no shape is carried by the others
        assert quality["draws"][shape]["n"] == per_shape
        assert quality["draws"][shape]["rate"] >= 0.8, shape
    assert quality["judge_on_renders"]["rate"] >= 0.98 and quality["judge_empty_is_none"]["rate"] == 1.0


def test_image_prompts_steer_generation(shipped):
    """IP-Adapter: with an empty text prompt, the image embedding alone decides shape and colour."""
    from coerase_jax.diffusion.pipeline import Sampler

    bundle, judge, of_world = shipped
    rng = np.random.default_rng(7)
    scenes = [world.Scene(s, c, 9.0, (16.0, 16.0)) for s in of_world.shapes for c in ("red", "blue")] * 4
    embeds = np.asarray(bundle.encode_images(world.render_many(scenes).astype(np.float32) / 255.0))
    images = Sampler(bundle, 25, 3.0, 48)([""] * len(scenes), list(rng.integers(0, 10**6, len(scenes))),
                                          image_embeds=embeds, progress=False)
    shapes, colours = judge(images)
    assert np.mean([(s == sc.shape) and (c == sc.colour) for s, c, sc in zip(shapes, colours, scenes)]) >= 0.7


def _erase(out, images_per_group: int, *config_args: str) -> dict:
    """`coerase erase --out DIR [--config C ...]` in a process with one CPU device, as README runs it
    (the tests' 8 simulated devices would not divide the erase batch); its report.json."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-m", "coerase_jax.cli", "erase", "--out", str(out), *config_args,
                           f"--config.report.images_per_group={images_per_group}", "--config.checkpoint.every=1000"],
                          env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["split"] == "test"
    return report


def _main_job(out, images_per_group: int):
    """The default main job's (original, text stage, Co-Erasing) figures."""
    report = _erase(out, images_per_group)
    assert (out / "grid.png").is_file()
    assert report["concept"] == "circle"
    n = images_per_group
    assert report["methods"]["original"]["images"] == {"named": n, "paraphrase": n, "square": n, "triangle": n}
    return tuple(report["methods"][m] for m in ("original", "text_only", "co_erasing"))


def test_main_job_erases_circles_and_keeps_the_other_shapes(tmp_path):
    """The main job judged on 24 images a group (6 a prompt). Its figures on 256 test images a group are
    8.6 % named, 9.0 % paraphrased, the other shapes 2.1 points down; on 24 images one image is 4 points, so
    the bounds leave room for another CPU's rounding to flip a few images (the slow test below judges
    256 a group). An erasure that did not work leaves the circles near the original's 95 %."""
    original, text_stage, co_erasing = _main_job(tmp_path / "toyworld", images_per_group=24)
    assert original["erased_rate_named"] >= 0.9 and original["erased_rate_paraphrase"] >= 0.9
    assert co_erasing["erased_rate_named"] <= 0.3 and co_erasing["erased_rate_paraphrase"] <= 0.3
    # the image stage erases further than the text stage it starts from
    assert co_erasing["erased_rate_named"] + co_erasing["erased_rate_paraphrase"] < (
        text_stage["erased_rate_named"] + text_stage["erased_rate_paraphrase"])
    for shape in ("square", "triangle"):  # and the other shapes hold
        assert co_erasing["per_shape"][shape] >= original["per_shape"][shape] - 0.15, shape


@pytest.mark.slow  # ~5 min: the main job as README runs it
def test_main_job_meets_the_issue_targets(tmp_path):
    """Issue #18's thresholds on the test seeds, 256 images a group: circles in <= 10 % of the images of
    prompts naming them and <= 20 % of paraphrases; the other shapes' accuracy falls <= 5 points.
    (Measured here: 8.6 %, 9.0 %, -2.1 points; the other erasure seeds are in docs/experiments.md.)"""
    original, _, co_erasing = _main_job(tmp_path / "toyworld", images_per_group=256)
    assert original["erased_rate_named"] >= 0.9 and original["erased_rate_paraphrase"] >= 0.9
    assert co_erasing["erased_rate_named"] <= 0.10 and co_erasing["erased_rate_paraphrase"] <= 0.20
    assert co_erasing["other_change"]["change"] >= -0.05 and co_erasing["rates"]["named"]["n"] == 256


@pytest.mark.slow  # ~11 min: configs/joint_toyworld.py as README runs it
def test_joint_erasure_of_three_shapes_meets_the_issue_targets(tmp_path):
    """Issue #21's thresholds on the test seeds, 256 images a group: circle, square and triangle erased
    into one model of the six-shape world, each shown in <= 15 % of its named and <= 25 % of its
    paraphrase images; cross, star and diamond each within 5 points of the original. Measured with the
    preservation term (a departure; the held shapes are kept by name): circle 9.8 / 14.1 %, square
    11.7 / 11.3 %, triangle 1.2 / 2.0 %; cross -0.8, star 0.0, diamond -2.3 points (without it the
    diamond lost 8.6)."""
    report = _erase(tmp_path / "joint", 256, "--config", "configs/joint_toyworld.py")
    original, joint = report["methods"]["original"], report["methods"]["co_erasing"]
    assert report["concepts"] == ["circle", "square", "triangle"]
    for shape, figures in joint["per_concept"].items():
        assert original["per_concept"][shape]["erased_rate_named"] >= 0.9, shape
        assert figures["named"]["n"] == figures["paraphrase"]["n"] == 256
        assert figures["erased_rate_named"] <= 0.15 and figures["erased_rate_paraphrase"] <= 0.25, shape
    for shape in ("cross", "star", "diamond"):
        assert joint["remaining"][shape] >= original["remaining"][shape] - 0.05, shape


@pytest.mark.slow  # ~10 min: configs/toyworld_six_preserve.py as README runs it
def test_six_shape_main_job_with_the_preservation_term_meets_the_issue_targets(tmp_path):
    """Issue #18's thresholds carried to the six-shape world (#21), on the test seeds, 256 images a
    group: circles in <= 10 % of the named and <= 20 % of the paraphrase images, the other five shapes
    within 5 points — met only with the preservation term (a departure; the other five are kept by
    name). Measured: 3.5 %, 10.9 %, -3.8 points (the paper's recipe, configs/toyworld_six.py: 18.4 %,
    26.2 %, -6.2). This is erasure seed 0, the shipped job; seeds 1 and 2 erase further and cost the
    other shapes 6.3 and 6.1 points (configs/toyworld_six_preserve_seeds.py, docs/experiments.md)."""
    report = _erase(tmp_path / "six", 256, "--config", "configs/toyworld_six_preserve.py")
    original, co_erasing = report["methods"]["original"], report["methods"]["co_erasing"]
    assert report["concept"] == "circle" and len(report["settings"]["preserved"]) == 15
    assert original["erased_rate_named"] >= 0.9 and original["erased_rate_paraphrase"] >= 0.9
    assert co_erasing["rates"]["named"]["n"] == co_erasing["rates"]["paraphrase"]["n"] == 256
    assert co_erasing["erased_rate_named"] <= 0.10 and co_erasing["erased_rate_paraphrase"] <= 0.20
    assert co_erasing["other_change"]["change"] >= -0.05


@pytest.mark.slow  # ~2 min, compile-bound (six parts); kept out of the default run for its time budget
def test_build_chain_writes_a_loadable_bundle_and_resumes_finished_parts(tmp_path):
    """A few steps of every part (not a useful model): the chain runs and its output loads like SD."""
    from coerase_jax.models.bundle import load_bundle
    from coerase_jax.toyworld.classifier import Judge
    from coerase_jax.toyworld.train import TrainPlan, build_world_model

    out = build_world_model(tmp_path / "world", TrainPlan.quick(), progress=False)
    bundle = load_bundle(str(out))
    assert bundle.image is not None and bundle.latent_shape == (4, 8, 8)
    assert bundle.text_encoder.config.max_position_embeddings == 16
    assert Judge(out)(np.zeros((2, 32, 32, 3), np.uint8))[0].shape == (2,)
    unet_file = out / "unet" / "diffusion_pytorch_model.safetensors"
    first = unet_file.read_bytes()
    parts = {p.name: p.stat().st_mtime_ns for p in (out / ".parts").iterdir()}
    unet_file.unlink()
    build_world_model(out, TrainPlan.quick(), progress=False)  # every part is reused, none retrained
    assert {p.name: p.stat().st_mtime_ns for p in (out / ".parts").iterdir()} == parts
    assert unet_file.read_bytes() == first
    assert json.loads((out / "build.json").read_text())["plan"]["unet_steps"] == 3
    with pytest.raises(UserError, match="another plan"):  # parts of one plan never leak into another
        build_world_model(out, TrainPlan(unet_steps=4), progress=False)


@pytest.mark.slow  # ~75 s: the chain again, for the six-shape world
def test_a_six_shape_build_says_its_world_and_its_judge_knows_six_shapes(tmp_path):
    import dataclasses

    from coerase_jax.evaluate.prompts import toyworld_rows
    from coerase_jax.toyworld.classifier import Judge
    from coerase_jax.toyworld.train import TrainPlan, build_world_model

    out = build_world_model(tmp_path / "six", dataclasses.replace(TrainPlan.quick(), world="six"), progress=False)
    judge = Judge(out)
    assert judge.world is world.SIX_SHAPES and judge.shape_classes[-1] == "none" and len(judge.shape_classes) == 7
    assert judge.probabilities(np.zeros((2, 32, 32, 3), np.uint8))[0].shape == (2, 7)
    groups = {r.group_name for r in toyworld_rows("star", 4, "dev", judge.world)}
    assert groups == {"named", "paraphrase", "circle", "square", "triangle", "cross", "diamond"}
    with pytest.raises(UserError, match="the worlds are three, six"):
        build_world_model(tmp_path / "other", dataclasses.replace(TrainPlan.quick(), world="seven"), progress=False)


def test_report_figures_are_the_judges_fractions():
    """evaluate() with a scripted sampler and judge: each figure is the hand-counted fraction."""
    from coerase_jax.toyworld import report

    class Sampler:  # "draws" a circle for every second paraphrase image, else what the prompt names
        def __call__(self, prompts, seeds, **kwargs):
            self.prompts = list(prompts)
            return np.arange(len(prompts))

    class Judge:  # sure of its verdict, except on the paraphrases it calls "none" (a smear)
        world = world.THREE_SHAPES

        def __init__(self, sampler):
            self.sampler = sampler

        def names(self, shape_probs, colour_probs):
            from coerase_jax.toyworld.classifier import names

            return names(shape_probs, colour_probs)

        def probabilities(self, images):
            from coerase_jax.toyworld.classifier import COLOUR_CLASSES, SHAPE_CLASSES

            shapes, colours = np.zeros((len(images), len(SHAPE_CLASSES))), np.zeros((len(images), 4))
            for i in images:
                prompt = self.sampler.prompts[i]
                colour = prompt.split()[1]
                named = next((s for s in world.SHAPES if world.NAMES[s] in prompt), None)
                if named is None:  # a paraphrase of circle
                    named = "circle" if i % 2 else "none"
                elif named == "square" and colour == "red":
                    colour = "blue"  # red squares come out blue: wrong colour counts as wrong
                shapes[i, SHAPE_CLASSES.index(named)] = 0.6 if named == "none" else 1.0
                colours[i, COLOUR_CLASSES.index(colour)] = 1.0
            return shapes, colours

    sampler = Sampler()
    figures, images, right, others = report.evaluate(sampler, Judge(sampler), None, "circle", images_per_group=8,
                                                     split="dev", progress=False)
    assert figures["erased_rate_named"] == 1.0
    assert figures["erased_rate_paraphrase"] == 0.5
    assert figures["per_shape"] == {"circle": 1.0, "square": 0.75, "triangle": 1.0}  # 2 of 8 squares are red
    assert figures["other_accuracy"] == 0.875 and figures["rates"]["others_right"]["k"] == 14
    assert figures["images"] == {"named": 8, "paraphrase": 8, "square": 8, "triangle": 8}
    assert figures["coherence"]["paraphrase"]["rate"] == 0.5 and figures["coherence"]["named"]["rate"] == 1.0
    assert len(images["paraphrase"]) == 8 and others.sum() == 16 and right.sum() == 14
    # every image its own seed, from the dev range, and each colour drawn equally often
    from coerase_jax.evaluate.prompts import SEED_SPLITS, toyworld_rows

    rows = toyworld_rows("circle", 8, "dev")
    assert [r.seed for r in rows] == list(range(SEED_SPLITS["dev"], SEED_SPLITS["dev"] + 32))
    assert [r.colour for r in rows[:8]] == list(world.COLOURS) * 2
    assert {r.seed for r in toyworld_rows("circle", 8, "test")}.isdisjoint(r.seed for r in rows)


def test_joint_report_figures_are_the_judges_fractions():
    """judge_joint() with a scripted sampler and judge on the six-shape world (circle, square and
    triangle erased; cross, star and diamond held): each figure is the hand-counted fraction."""
    from coerase_jax.evaluate.prompts import SEED_SPLITS
    from coerase_jax.toyworld import report

    six = world.SIX_SHAPES
    of_noun = {noun: shape for shape in six.shapes for noun in six.nouns(shape)}

    class Sampler:
        def __call__(self, prompts, seeds, unet_params=None, **kwargs):
            self.prompts, self.seeds, self.model = list(prompts), list(seeds), unet_params
            return np.arange(len(prompts))

    class Judge:
        world = six

        def __init__(self, sampler):
            self.sampler = sampler

        def __call__(self, images):
            shapes, colours = [], []
            for i in images:
                prompt, k = self.sampler.prompts[i], (self.sampler.seeds[i] - SEED_SPLITS["dev"]) % 8
                colour, noun = prompt.split()[1], " ".join(prompt.split()[2:])
                shape, named = of_noun[noun], noun in six.shapes
                if self.sampler.model == "erased":
                    if shape == "circle":  # 2 of 8 named circles survive, no paraphrased one
                        shape = "circle" if named and k % 4 == 0 else "none"
                    elif shape == "square":
                        shape = "none"
                    elif shape == "triangle" and (named or k % 2):  # half the paraphrased triangles survive
                        shape = "none"
                    elif shape == "star" and colour == "red":
                        colour = "blue"  # 2 of 8 stars in the wrong colour
                shapes.append(shape)
                colours.append(colour)
            return np.asarray(shapes, object), np.asarray(colours, object)

    sampler = Sampler()
    got = report.judge_joint(sampler, Judge(sampler), {"original": "original", "erased": "erased"},
                             ["circle", "square", "triangle"], images_per_group=8, split="dev", progress=False)
    assert got["settings"]["seeds"] == [SEED_SPLITS["dev"], SEED_SPLITS["dev"] + 9 * 8 - 1]  # each image its own
    original, erased = got["methods"]["original"], got["methods"]["erased"]
    assert all(c["erased_rate_named"] == c["erased_rate_paraphrase"] == 1.0 for c in original["per_concept"].values())
    rates = {s: (c["erased_rate_named"], c["erased_rate_paraphrase"]) for s, c in erased["per_concept"].items()}
    assert rates == {"circle": (0.25, 0.0), "square": (0.0, 0.0), "triangle": (0.0, 0.5)}
    assert erased["per_concept"]["circle"]["named"]["k"] == 2 and erased["per_concept"]["triangle"]["paraphrase"]["n"] == 8
    assert original["remaining"] == {"cross": 1.0, "star": 1.0, "diamond": 1.0}
    assert erased["remaining"] == {"cross": 1.0, "star": 0.75, "diamond": 1.0}
    assert erased["remaining_accuracy"] == 22 / 24
    assert erased["remaining_change"]["star"]["change"] == -0.25
    assert erased["remaining_change"]["all"]["change"] == pytest.approx(-2 / 24)
    assert "remaining_change" not in original
    table = report.format_joint_table(got)
    assert "shows a triangle: paraphrases" in table and "50.0% (4/8)" in table and "star (not erased) right" in table
    assert "paraphrases right" not in table and "preservation" not in table

    # the held shapes' paraphrases (report.held_paraphrases): three more groups after the others, whose
    # rows and figures stay as they were; a held paraphrase counts as drawn right like a named one
    wider = report.judge_joint(sampler, Judge(sampler), {"original": "original", "erased": "erased"},
                               ["circle", "square", "triangle"], images_per_group=8, split="dev", progress=False,
                               held_paraphrases=True)
    rows = report.joint_rows(["circle", "square", "triangle"], 8, "dev", six, held_paraphrases=True)
    assert rows[:72] == report.joint_rows(["circle", "square", "triangle"], 8, "dev", six)
    assert [r.group_name for r in rows[72::8]] == ["cross:paraphrase", "star:paraphrase", "diamond:paraphrase"]
    assert all(" ".join(r.prompt.split()[2:]) in six.paraphrases[r.label] for r in rows[72:])
    red_stars = sum(r.colour == "red" for r in rows[80:88])
    assert 0 < red_stars < 8
    w_original, w_erased = wider["methods"]["original"], wider["methods"]["erased"]
    for key in ("per_concept", "remaining", "remaining_accuracy", "remaining_change"):
        assert w_erased[key] == erased[key], key
    assert {s: r["k"] for s, r in w_original["remaining_paraphrase_rates"].items()} == {"cross": 8, "star": 8, "diamond": 8}
    assert {s: r["k"] for s, r in w_erased["remaining_paraphrase_rates"].items()} == {
        "cross": 8, "star": 8 - red_stars, "diamond": 8}
    assert w_erased["remaining_paraphrase_change"]["star"]["change"] == -red_stars / 8
    assert f"{100 * (8 - red_stars) / 8:.1f}% ({8 - red_stars}/8)" in report.format_joint_table(wider)
    assert "star paraphrases right" in report.format_joint_table(wider)
    wider["settings"]["preserved"] = ["a star", "a cross"]  # a report of a run with a preservation term says so
    assert report.format_joint_table(wider).splitlines()[-1] == (
        "kept by the preservation term (seen by the erasure, a departure): a star; a cross")


def test_kept_joint_verdicts_are_reused_only_for_the_same_rows(tmp_path):
    """A frontier rerun with more points judges only the new models: kept verdicts give the same
    figures without sampling; other rows (another group size) are judged afresh."""
    from coerase_jax.toyworld import report

    six = world.SIX_SHAPES
    of_noun = {noun: shape for shape in six.shapes for noun in six.nouns(shape)}

    class Sampler:
        calls = 0

        def __call__(self, prompts, seeds, unet_params=None, **kwargs):
            self.calls += 1
            self.prompts, self.model = list(prompts), unet_params
            return np.arange(len(prompts))

    class Judge:
        world = six

        def __call__(self, images):  # the erased model draws no circle; the original draws every prompt right
            shapes = [of_noun[" ".join(self.sampler.prompts[i].split()[2:])] for i in images]
            shapes = ["none" if s == "circle" and self.sampler.model == "erased" else s for s in shapes]
            return np.asarray(shapes, object), np.asarray([self.sampler.prompts[i].split()[1] for i in images], object)

    sampler, judge = Sampler(), Judge()
    judge.sampler = sampler
    models = {"original": "original", "erased": "erased"}
    judged = lambda n: report.judge_joint(sampler, judge, models, ["circle", "square"], n, "dev", False, tmp_path)
    first = judged(8)
    assert sampler.calls == 2 and first["methods"]["erased"]["per_concept"]["circle"]["named"]["k"] == 0
    assert judged(8) == first and sampler.calls == 2  # both models' verdicts were kept
    assert judged(4)["methods"]["original"]["per_concept"]["circle"]["named"]["n"] == 4 and sampler.calls == 4


def test_plan_overrides_change_the_named_fields_and_refuse_unknown_ones():
    from coerase_jax.errors import UserError
    from coerase_jax.toyworld.train import TrainPlan

    plan = TrainPlan().with_overrides(["unet_steps=2000", "clip_every_position=false", "colourless_fraction=0.1"])
    assert (plan.unet_steps, plan.clip_every_position, plan.colourless_fraction) == (2000, False, 0.1)
    assert plan.clip_steps == TrainPlan().clip_steps  # the rest unchanged
    for bad in ("unet_step=3", "unet_steps", "unet_steps=many", "clip_every_position=maybe"):
        with pytest.raises(UserError):
            TrainPlan().with_overrides([bad])


@pytest.mark.cross_program
def test_token_identity_loss_counts_the_words_only_and_rewards_states_pointing_at_their_token():
    from coerase_jax.toyworld.train import token_identity_loss

    vocab, eos = 6, 5
    table = np.eye(vocab, 8, dtype=np.float32) * 0.3  # orthogonal rows; the norm must not matter (cosine)
    ids = np.array([[4, 1, 2, eos, eos], [4, 3, eos, eos, eos]])
    own = 7.0 * table[ids]  # each state points at its own token, at another norm
    own[ids == eos] = np.random.default_rng(0).normal(size=(5, 8))  # from the end-of-text token on: ignored
    # by hand: cosine 1 to its own row, 0 to the other five -> -log(e^10 / (e^10 + 5))
    expected = np.log1p(5 * np.exp(-10.0))
    # float32 vs exact: cosines over 8 dims, then a log-sum-exp over 6 logits of size 10 and the mean
    # over 3 words (the loss is a small difference of two such sums: its rounding scales with the logits)
    assert_same_maths(token_identity_loss(own, table, ids, eos), expected, 8 + 6 + 3 + 6, scale=10.0)
    shared = np.broadcast_to(table[4] + table[1], own.shape)  # every word the same state, as a tower without it
    # cosine 1/sqrt2 to tokens 4 and 1, 0 to the rest; the words are 4,1,2 and 4,3: three score c = 10/sqrt2,
    # two score 0, each against a partition 2 e^c + 4
    c = 10.0 / np.sqrt(2.0)
    expected = np.log(2 * np.exp(c) + 4) - 3 * c / 5
    assert_same_maths(token_identity_loss(shared, table, ids, eos), expected, 8 + 6 + 5 + 6, scale=10.0)


def test_coherence_separates_renders_from_noise_and_textures():
    """A clean picture of the world (the judge sure of one shape and one colour) vs what an
    over-erased model draws: noise, or mottled fields of colour without a shape."""
    from coerase_jax.models.presets import TOYWORLD_DIR
    from coerase_jax.toyworld.classifier import Judge, coherent

    judge = Judge(TOYWORLD_DIR)
    rng = np.random.default_rng(0)
    renders = world.render_many(world.random_scenes(rng, 128), rng)
    noise = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    blobs = np.kron(rng.normal(size=(128, 4, 4, 3)), np.ones((1, 8, 8, 1)))  # 8-px patches of colour
    textures = np.clip(128 + 60 * blobs + 20 * rng.normal(size=blobs.shape), 0, 255).astype(np.uint8)
    clean = {name: coherent(*judge.probabilities(images)).mean()
             for name, images in (("renders", renders), ("noise", noise), ("textures", textures))}
    assert clean["renders"] >= 0.95 and clean["noise"] <= 0.05 and clean["textures"] <= 0.3, clean
