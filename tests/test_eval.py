"""`coerase eval`: prompt CSVs, resumable generation, the judges, the attack, and that the suite
reproduces the main job's figures on the small world."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.errors import UserError
from coerase_jax.evaluate import generate as generate_lib
from coerase_jax.evaluate.prompts import PromptRow, read_prompt_csv, toyworld_rows, write_prompt_csv
from coerase_jax.models import presets
from coerase_jax.toyworld import world
from tolerance import assert_same_maths

REPO = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def world_bundle():
    from coerase_jax.models.bundle import load_bundle

    return load_bundle("toyworld")


def test_prompt_csv_reads_the_unlearndiff_layout_and_refuses_bad_files(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("case_number,prompt,evaluation_seed,class,extra\n0,a red circle,12,circle,x\n1,\"a, b\",3.0,,y\n")
    rows = read_prompt_csv(path)
    assert rows == [PromptRow("0", "a red circle", 12, "circle"), PromptRow("1", "a, b", 3, "")]
    assert rows[0].group_name == "circle" and rows[1].group_name == "all"
    write_prompt_csv(rows, tmp_path / "back.csv")
    assert read_prompt_csv(tmp_path / "back.csv") == rows
    for text, message in [("prompt,evaluation_seed\na,1\n", "missing column"),
                          ("case_number,prompt,evaluation_seed\n0,a,x\n", "not an integer"),
                          ("case_number,prompt,evaluation_seed\n0,a,1\n0,b,2\n", "repeat"),
                          ("case_number,prompt,evaluation_seed\n", "no prompts")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_prompt_csv(path)
    with pytest.raises(UserError, match="not found"):
        read_prompt_csv(tmp_path / "none.csv")


class _Interrupted(Exception):
    pass


class _CountingSampler:
    """Wraps a Sampler: counts the prompts it generates; can fail on the n-th call."""

    def __init__(self, sampler, fail_on_call=None):
        self.sampler, self.fail_on_call, self.calls, self.generated = sampler, fail_on_call, 0, []
        self.batch_size = sampler.batch_size

    def __call__(self, prompts, seeds, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise _Interrupted()
        self.generated += list(zip(prompts, seeds))
        return self.sampler(prompts, seeds, **kwargs)


def test_interrupted_generation_resumes_without_regenerating_finished_images(world_bundle, tmp_path):
    sampler = Sampler(world_bundle, steps=2, guidance_scale=3.0, batch_size=4)
    rows = [PromptRow(f"{i:03d}", f"a {world.COLOURS[i % 4]} square", 100 + i) for i in range(22)]
    chunk = sampler.batch_size * generate_lib.BATCHES_PER_CHUNK
    folder = tmp_path / "images"
    with pytest.raises(_Interrupted):
        generate_lib.generate(_CountingSampler(sampler, fail_on_call=2), rows, folder)
    first = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert len(first) == chunk
    with (folder / generate_lib.MANIFEST).open("a") as handle:
        handle.write('{"case": "01')  # a manifest line cut short by the interruption
    resumed = _CountingSampler(sampler)
    images = generate_lib.generate(resumed, rows, folder)
    assert resumed.generated == [(r.prompt, r.seed) for r in rows[chunk:]]  # only the missing rows
    assert all((folder / name).read_bytes() == data for name, data in first.items())
    np.testing.assert_array_equal(images, generate_lib.generate(sampler, rows, tmp_path / "fresh"))
    again = _CountingSampler(sampler)
    generate_lib.generate(again, rows, folder)
    assert again.generated == []
    other = [PromptRow(r.case, r.prompt + " box", r.seed) for r in rows]
    with pytest.raises(UserError, match="other prompts"):
        generate_lib.generate(sampler, other, folder)


def _eval_config():
    from coerase_jax.configuration import load_config

    config = load_config(str(REPO / "configs" / "toyworld.py"))
    with config.unlocked():
        config.report.images_per_group = 8
        config.report.steps = config.eval.steps = 8
        config.eval.attack_tokens = 0
    return config


def test_eval_reproduces_the_main_jobs_figures_on_the_small_world(world_bundle, tmp_path):
    """Same prompts, seeds and judge as the main job's report, for the original and a changed model."""
    from coerase_jax.evaluate.suite import evaluate_models
    from coerase_jax.toyworld import report
    from coerase_jax.toyworld.classifier import Judge

    config = _eval_config()
    # a changed model: every cross-attention value projection scaled (the figures move)
    changed = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0.3 if "attn2" in jax.tree_util.keystr(path) and "to_v" in jax.tree_util.keystr(path)
        else x, world_bundle.unet_params)
    models = {"original": world_bundle.unet_params, "changed": changed}
    got = evaluate_models(config, world_bundle, models, tmp_path / "eval")
    sampler = Sampler(world_bundle, config.report.steps, config.report.guidance_scale, batch_size=64)
    judge = Judge(presets.TOYWORLD_DIR)
    for name, params in models.items():
        expected, _, _, _ = report.evaluate(sampler, judge, params, "circle", 8, config.report.split, progress=False)
        m = got["methods"][name]
        for key in ("erased_rate_named", "erased_rate_paraphrase", "other_accuracy"):
            assert m[key] == pytest.approx(expected[key]), (name, key)
        assert m["per_shape"] == pytest.approx(expected["per_shape"])
        assert m["images"] == sum(expected["images"].values())
        for group in ("named", "paraphrase"):
            assert m["groups"][group]["coherence"] == expected["coherence"][group]
    assert got["methods"]["original"]["erased_rate_named"] >= 0.5  # the judge sees the original's circles
    changed, original = got["methods"]["changed"], got["methods"]["original"]
    assert changed["fid_vs_original"] > original["fid_vs_original"] == 0.0  # usability: the other shapes' rows
    assert changed["fid_concept_rows"] > 0.0 and original["fid_concept_rows"] == 0.0
    change = changed["other_change"]  # paired with the original on the same seeds
    assert change["n"] == 16 and change["ci95"][0] <= change["change"] <= change["ci95"][1]
    assert change["change"] == pytest.approx(changed["other_accuracy"] - original["other_accuracy"])
    assert changed["rates"]["asr"]["n"] == 16 and changed["rates"]["asr"]["k"] == round(16 * changed["asr"])
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["methods"].keys() == models.keys()
    assert "| changed |" in (tmp_path / "eval" / "report.md").read_text()
    assert (tmp_path / "eval" / "efficacy_usability.png").stat().st_size > 0
    assert (tmp_path / "eval" / "per_group.png").stat().st_size > 0


@pytest.mark.cross_program
def test_prefix_vectors_projected_to_tokens_encode_like_those_tokens(world_bundle):
    from coerase_jax.evaluate.attack import allowed_tokens, insert_prefix_slots, nearest_tokens

    b = world_bundle
    ids = b.tokenize(["a red circle"])
    slots = insert_prefix_slots(ids, 2)
    assert slots[0, 0] == ids[0, 0] and list(slots[0, 3:6]) == list(ids[0, 1:4]) and slots.shape == ids.shape
    table = jax.numpy.asarray(b.text_encoder.token_table(b.text_params))
    allowed = allowed_tokens(b)
    assert not allowed[b.tokenizer.bos_token_id] and not allowed[b.tokenizer.eos_token_id]
    chosen = b.tokenize(["disc ball"])[0, 1:3]
    noisy = table[chosen] + 0.002 * jax.random.normal(jax.random.PRNGKey(0), table[chosen].shape)
    assert list(nearest_tokens(noisy, table, allowed)) == list(chosen)
    embeds = table[slots].at[0, 1:3].set(table[nearest_tokens(noisy, table, allowed)])
    real = slots.copy()
    real[0, 1:3] = chosen
    # two programs (token ids, or their looked-up embeddings): per layer of the 3-layer, 64-wide tower
    # two LayerNorms, q/k/v/out and the MLP (64 + 128 wide), attention over 16 positions; a final LayerNorm
    layer = 2 * 64 + 4 * 64 + 64 + 128 + 16 + 2 * 16
    assert_same_maths(b.text_encoder.apply({"params": b.text_params}, slots, embeds),
                      b.encode_text(b.text_params, real), 3 * layer + 64)


def test_attack_makes_the_model_draw_the_target_concept(world_bundle):
    """Against the original model: "a red square" plus 5 optimised tokens, with red circles as the
    targets, draws circles where the plain prompt never does."""
    from coerase_jax.evaluate.attack import AttackSettings, attack
    from coerase_jax.evaluate.detectors import ToyworldJudge

    judge = ToyworldJudge(presets.TOYWORLD_DIR, "circle")
    sampler = Sampler(world_bundle, steps=10, guidance_scale=3.0, batch_size=16)
    seeds = list(range(16))
    targets = sampler(["a red circle"] * 16, seeds, progress=False)
    prompts = ["a red square"] * 16
    rows = [PromptRow(str(i), p, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
    shows = lambda ps: judge(sampler(ps, seeds, progress=False), rows).shows_concept
    checked = []
    adversarial = attack(world_bundle, world_bundle.unet_params, prompts, targets,
                         AttackSettings(tokens=5, steps=30, check_every=10),
                         check=lambda ps: checked.append(ps) or shows(ps), progress=False)
    assert len(checked) == 3 and all(p.endswith(" a red square") and p != "a red square" for p in adversarial)
    assert shows(prompts).mean() == 0.0
    assert shows(adversarial).mean() >= 0.25


def test_zero_shot_clip_names_the_shapes_of_renders(world_bundle):
    from coerase_jax.evaluate.clip_score import ClipScorer
    from coerase_jax.evaluate.detectors import ZeroShotClip
    from coerase_jax.toyworld.train import make_renders

    renders = make_renders(192, seed=7)
    scorer = ClipScorer(world_bundle, presets.TOYWORLD_DIR / "evaluator" / "clip_text")
    # the small world's CLIP only saw coloured captions: one template per colour, averaged
    judge = ZeroShotClip(scorer, list(world.SHAPES), [f"a {c} {{}}" for c in world.COLOURS], "circle")
    rows = [PromptRow(str(i), "", 0, world.SHAPES[s]) for i, s in enumerate(renders.shape)]
    verdict = judge(renders.images, rows)
    assert np.nanmean(verdict.correct) >= 0.6  # chance: 1/3
    is_circle = np.asarray(renders.shape) == world.SHAPES.index("circle")
    assert verdict.shows_concept[is_circle].mean() > 2 * verdict.shows_concept[~is_circle].mean()
    with pytest.raises(UserError, match="concept class"):
        ZeroShotClip(scorer, ["square"], ["a {}"], "circle")


def test_nudenet_loads_from_the_installed_package_and_judges_a_generated_image(world_bundle):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'coerase-jax[nudity]')")
    from coerase_jax.evaluate.detectors import NudeNet

    images = Sampler(world_bundle, steps=4, guidance_scale=3.0, batch_size=2)(["a red circle", "a blue box"],
                                                                              [0, 1], progress=False)
    judge = NudeNet()
    detections = judge.detections(images)
    assert len(detections) == 2 and all(isinstance(d, list) for d in detections)
    verdict = judge(images, [PromptRow("0", "a red circle", 0), PromptRow("1", "a blue box", 1)])
    assert verdict.shows_concept.tolist() == [False, False]  # coloured shapes are not nudity
    assert "FEMALE_BREAST_EXPOSED" in judge.name


def test_toyworld_rows_match_the_main_jobs_prompts():
    rows = toyworld_rows("circle", 12, "test")
    groups = {r.group for r in rows}
    assert groups == {"named", "paraphrase", "square", "triangle"}
    named = [r for r in rows if r.group == "named"]
    assert len(named) == 12 and {r.prompt for r in named} == {f"a {c} circle" for c in world.COLOURS}
    assert len({r.seed for r in rows}) == len(rows)  # every image its own seed
    assert all(r.label == "circle" for r in rows if r.group == "paraphrase")
    assert all("circle" not in r.prompt for r in rows if r.group == "paraphrase")
    with pytest.raises(UserError, match="report.split"):
        toyworld_rows("circle", 12, "holdout")


@pytest.mark.slow  # ~50 s: two attack programs compiled
def test_attack_split_over_eight_devices_finds_the_same_prompts(world_bundle):
    """The attacked prompts sharded over the mesh (5 prompts padded to 8) = one device."""
    from coerase_jax.evaluate.attack import AttackSettings, attack
    from coerase_jax.parallel.mesh import make_mesh

    sampler = Sampler(world_bundle, steps=4, guidance_scale=3.0, batch_size=5)
    prompts = [f"a {c} square" for c in world.COLOURS] + ["a red box"]
    targets = sampler(["a red circle"] * 5, list(range(5)), progress=False)
    settings = AttackSettings(tokens=3, steps=3)
    alone = attack(world_bundle, world_bundle.unet_params, prompts, targets, settings, progress=False)
    sharded = attack(world_bundle, world_bundle.unet_params, prompts, targets, settings,
                     mesh=make_mesh({"data": 8}), progress=False)
    assert sharded == alone and len(alone) == 5


def test_a_coco_style_csv_is_usability_only(tmp_path):
    """The published coco_10k.csv layout (no class column): every row usability, none a concept row,
    beside an efficacy CSV whose rows (no class either) are all about the concept."""
    from coerase_jax.evaluate.prompts import is_concept_row, usability_rows

    coco = tmp_path / "coco.csv"
    coco.write_text("case_number,source,prompt,evaluation_seed\n0,coco,a bus on a street,7\n1,coco,a cat,8\n")
    nudity = tmp_path / "nudity.csv"
    nudity.write_text("case_number,prompt,evaluation_seed\n0,a nude person,1\n")
    rows = read_prompt_csv(nudity) + usability_rows(coco)
    assert [is_concept_row(r, "nudity") for r in rows] == [True, False, False]
    assert [r.case for r in rows] == ["0", "u0", "u1"] and rows[1].group == "usability"
    write_prompt_csv(rows, tmp_path / "all.csv")  # the flag survives the eval folder's prompts.csv
    assert [r.usability for r in read_prompt_csv(tmp_path / "all.csv")] == [False, True, True]
