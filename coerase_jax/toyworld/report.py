"""What an erasure did on the small world: the judge's verdict before and after, as numbers and a grid.

For the erased shape S and every model compared (original, text stage only, Co-Erasing), on the
judging rows of ``evaluate.prompts.toyworld_rows`` (``report.images_per_group`` images per group,
each with its own seed from the ``report.split`` range — "dev" to choose settings, "test" to report):

* ``erased_rate_named``: fraction of images from "a <colour> S" classified as S;
* ``erased_rate_paraphrase``: the same for S's paraphrases ("a <colour> disc", ...), which the
  erasure prompts never contain;
* ``per_shape``: for every shape T, the fraction of images from "a <colour> T" classified as T
  *and* that colour (the shipped model's own accuracy is this figure for the original);
* ``other_accuracy``: the same over the images of every shape other than S;
* ``rates``: each of these as k of n with a 95 % Wilson interval; ``other_change``: the change of
  ``other_accuracy`` from the original's, paired image by image, with its 95 % interval;
* ``coherence``: the fraction of images that are a clean picture of this world (the judge is
  sure of one shape and one colour, ``classifier.coherent``), for the named, paraphrase and other rows.

Every model sees the same prompts and the same seeds, so the differences are paired.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.errors import UserError
from coerase_jax.evaluate import stats
from coerase_jax.evaluate.prompts import SEED_SPLITS, PromptRow, rows_of_groups, toyworld_rows
from coerase_jax.models import presets
from coerase_jax.parallel import distributed
from coerase_jax.toyworld import world
from coerase_jax.toyworld.classifier import Judge, coherent

GRID_SEEDS = 4
GRID_SCALE = 2


def prompt_sets(shape: str, of_world: world.World = world.THREE_SHAPES) -> dict[str, list[tuple[str, str, str]]]:
    """Named, paraphrase and per-shape prompt lists of (prompt, shape it names, colour)."""
    if shape not in of_world.shapes:
        raise UserError(f"the small world has no shape {shape!r} (shapes: {', '.join(of_world.shapes)})")
    named = lambda s: [(f"a {c} {s}", s, c) for c in world.COLOURS]
    sets = {shape: named(shape),
            "paraphrase": [(f"a {c} {p}", shape, c) for c in world.COLOURS for p in of_world.paraphrases[shape]]}
    sets.update({s: named(s) for s in of_world.shapes if s != shape})
    return sets


def drawn_right(rows: list[PromptRow], got_shape: np.ndarray, got_colour: np.ndarray) -> np.ndarray:
    """Per image: did the judge see the shape and the colour its prompt asked for?"""
    return (got_shape == np.asarray([r.label for r in rows], object)) & (
        got_colour == np.asarray([r.colour for r in rows], object))


def evaluate(sampler: Sampler, judge: Judge, unet_params, shape: str, images_per_group: int, split: str,
             progress: bool = True, name: str = "") -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """One model's figures, its images per group, and per image whether it was drawn right (the
    asked shape and colour), for paired comparisons between models."""
    rows = toyworld_rows(shape, images_per_group, split, judge.world)
    images = sampler([r.prompt for r in rows], [r.seed for r in rows], unet_params=unet_params, progress=progress,
                     desc=f"judging {name}".strip())
    probs = judge.probabilities(images)
    got_shape, got_colour = judge.names(*probs)
    clean = coherent(*probs)
    group = np.asarray([r.group_name for r in rows], object)
    right = drawn_right(rows, got_shape, got_colour)
    shows_concept = got_shape == shape
    others = (group != "named") & (group != "paraphrase")
    of_shape = lambda s: group == ("named" if s == shape else s)
    figures = {"erased_rate_named": float(np.mean(shows_concept[group == "named"])),
               "erased_rate_paraphrase": float(np.mean(shows_concept[group == "paraphrase"])),
               "per_shape": {s: float(np.mean(right[of_shape(s)])) for s in judge.world.shapes},
               "other_accuracy": float(np.mean(right[others])),
               "images": {g: int(np.sum(group == g)) for g in dict.fromkeys(group)},
               "rates": {"named": stats.rate(shows_concept[group == "named"]),
                         "paraphrase": stats.rate(shows_concept[group == "paraphrase"]),
                         "others_right": stats.rate(right[others]),
                         **{f"{s}_right": stats.rate(right[of_shape(s)]) for s in judge.world.shapes}},
               "coherence": {"named": stats.rate(clean[group == "named"]),
                             "paraphrase": stats.rate(clean[group == "paraphrase"]),
                             "others": stats.rate(clean[others])}}
    by_group = {g: images[group == g] for g in dict.fromkeys(group)}
    return figures, by_group, np.where(others, right, False), others


def compare(bundle, models: dict[str, dict], shape: str, config_report, out_dir: str | Path,
            progress: bool = True, preserved: tuple[str, ...] = ()) -> dict:
    """Evaluates each named UNet (the first is the original), writes ``report.json`` and
    ``grid.png`` to ``out_dir``; returns the report. ``preserved``: the prompts a preservation term kept
    (concept.preserve), recorded because what they name was seen by the erasure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = Judge(presets.source_folder(bundle.source))
    sampler = Sampler(bundle, config_report.steps, config_report.guidance_scale, batch_size=64)
    methods, grids, baseline = {}, {}, None
    for name, params in models.items():
        figures, images, right, others = evaluate(sampler, judge, params, shape, config_report.images_per_group,
                                                  config_report.split, progress, name)
        if baseline is None:
            baseline = right
        else:  # the change in the other shapes' accuracy, image by image against the original
            figures["other_change"] = stats.paired_change(right[others], baseline[others])
        methods[name] = figures
        grids[name] = _grid_columns(images, shape, judge.world)
    count = sum(next(iter(methods.values()))["images"].values())
    start = SEED_SPLITS[config_report.split]
    report = {"concept": shape, "methods": methods,
              "settings": {"images_per_group": config_report.images_per_group, "split": config_report.split,
                           "seeds": [start, start + count - 1], "steps": config_report.steps,
                           "guidance_scale": config_report.guidance_scale, "preserved": list(preserved)}}
    if distributed.is_leader():
        tmp = out_dir / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out_dir / "report.json")
        _grid_image(grids, shape, judge.world).save(out_dir / "grid.png")
    return report


def joint_rows(shapes: list[str], images_per_group: int, split: str, of_world: world.World,
               held_paraphrases: bool = False) -> list[PromptRow]:
    """A joint erasure's judging rows, each image its own seed: every erased shape's named and
    paraphrase groups ("<shape>:named", "<shape>:paraphrase"), then each shape not erased, then
    (``held_paraphrases``) each shape not erased in its paraphrases ("<shape>:paraphrase")."""
    sets = {shape: prompt_sets(shape, of_world) for shape in shapes}
    held = [s for s in of_world.shapes if s not in shapes]
    groups = [(f"{shape}:{kind}", sets[shape][shape if kind == "named" else "paraphrase"])
              for shape in shapes for kind in ("named", "paraphrase")]
    groups += [(s, sets[shapes[0]][s]) for s in held]
    if held_paraphrases:
        groups += [(f"{s}:paraphrase", prompt_sets(s, of_world)["paraphrase"]) for s in held]
    return rows_of_groups(groups, images_per_group, split)


def judge_joint(sampler, judge: Judge, models: dict[str, dict], shapes: list[str], images_per_group: int, split: str,
                progress: bool = True, verdicts_dir: Path | None = None, held_paraphrases: bool = False) -> dict:
    """Each model's joint figures (the first model is the original): per erased shape the fractions
    of its named and paraphrase images the judge calls that shape; per shape not erased, the
    fraction drawn right (shape and colour) and its paired change from the original's, and with
    ``held_paraphrases`` the same for its paraphrase images ("remaining_paraphrase...").
    With ``verdicts_dir``, each model's verdicts are kept there by name and reused when its rows
    are the same (the caller names the folder after the sampler's settings)."""
    remaining = [s for s in judge.world.shapes if s not in shapes]
    rows = joint_rows(shapes, images_per_group, split, judge.world, held_paraphrases)
    group = np.asarray([r.group_name for r in rows], object)
    held = np.isin(group, remaining)
    methods, baseline = {}, None
    for name, params in models.items():
        got_shape, got_colour = _verdicts(sampler, judge, params, rows, name, progress, verdicts_dir)
        right = drawn_right(rows, got_shape, got_colour)
        per_concept = {}
        for shape in shapes:
            named = got_shape[group == f"{shape}:named"] == shape
            para = got_shape[group == f"{shape}:paraphrase"] == shape
            per_concept[shape] = {"erased_rate_named": float(np.mean(named)),
                                  "erased_rate_paraphrase": float(np.mean(para)),
                                  "named": stats.rate(named), "paraphrase": stats.rate(para)}
        methods[name] = {"per_concept": per_concept,
                         "remaining": {s: float(np.mean(right[group == s])) for s in remaining},
                         "remaining_rates": {s: stats.rate(right[group == s]) for s in remaining},
                         "remaining_accuracy": float(np.mean(right[held])) if remaining else None}
        if held_paraphrases:
            methods[name]["remaining_paraphrase_rates"] = {s: stats.rate(right[group == f"{s}:paraphrase"])
                                                           for s in remaining}
        if baseline is None:
            baseline = right
        elif remaining:
            methods[name]["remaining_change"] = {
                **{s: stats.paired_change(right[group == s], baseline[group == s]) for s in remaining},
                "all": stats.paired_change(right[held], baseline[held])}
            if held_paraphrases:
                methods[name]["remaining_paraphrase_change"] = {
                    s: stats.paired_change(right[group == f"{s}:paraphrase"], baseline[group == f"{s}:paraphrase"])
                    for s in remaining}
    return {"concepts": list(shapes), "methods": methods,
            "settings": {"images_per_group": images_per_group, "split": split,
                         "seeds": [rows[0].seed, rows[-1].seed]}}


def _verdicts(sampler, judge: Judge, params, rows: list[PromptRow], name: str, progress: bool,
              verdicts_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The judge's (shape, colour) for each row's image by the model ``params``, or the kept ones."""
    prompts, seeds = np.asarray([r.prompt for r in rows]), np.asarray([r.seed for r in rows])
    kept = verdicts_dir / f"{name}.npz" if verdicts_dir is not None else None
    if kept is not None and kept.is_file():
        with np.load(kept) as f:
            if np.array_equal(f["prompts"], prompts) and np.array_equal(f["seeds"], seeds):
                return f["shape"].astype(object), f["colour"].astype(object)
    images = sampler(list(prompts), [int(s) for s in seeds], unet_params=params, progress=progress,
                     desc=f"judging {name}")
    got_shape, got_colour = judge(images)
    if kept is not None and distributed.is_leader():
        verdicts_dir.mkdir(parents=True, exist_ok=True)
        tmp = verdicts_dir / f".{name}.tmp.npz"
        np.savez(tmp, prompts=prompts, seeds=seeds, shape=np.asarray(got_shape, str), colour=np.asarray(got_colour, str))
        tmp.replace(kept)
    return got_shape, got_colour


def compare_joint(bundle, models: dict[str, dict], shapes: list[str], config_report, out_dir: str | Path,
                  progress: bool = True, keep_verdicts: bool = False, preserved: tuple[str, ...] = ()) -> dict:
    """``judge_joint`` with the world's sampler and judge; writes ``report.json`` to ``out_dir``.
    ``keep_verdicts``: keep each model's verdicts in ``out_dir`` by name, for reruns that add models
    (the frontier's points; a name must always mean the same model). ``preserved``: as ``compare``'s."""
    out_dir = Path(out_dir)
    judge = Judge(presets.source_folder(bundle.source))
    sampler = Sampler(bundle, config_report.steps, config_report.guidance_scale, batch_size=64)
    kept = out_dir / f"verdicts-steps{config_report.steps}-cfg{config_report.guidance_scale:g}" if keep_verdicts else None
    report = judge_joint(sampler, judge, models, shapes, config_report.images_per_group, config_report.split,
                         progress, kept, config_report.held_paraphrases)
    report["settings"].update(steps=config_report.steps, guidance_scale=config_report.guidance_scale,
                              preserved=list(preserved))
    if distributed.is_leader():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out_dir / "report.json")
    return report


def format_joint_table(report: dict) -> str:
    """Rates with k/n; for the shapes that were not erased, the change from the original in points."""
    methods = report["methods"]
    width = 28
    cell = lambda r: f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']})"
    lines = [f"joint erasure of {', '.join(report['concepts'])} on the small world "
             f"({report['settings']['split']} seeds)",
             f"{'':34s}" + "".join(f"{name:>{width}s}" for name in methods)]
    for shape in report["concepts"]:
        for key, label in (("named", "named"), ("paraphrase", "paraphrases")):
            lines.append(f"{f'shows a {shape}: {label}':34s}"
                         + "".join(f"{cell(m['per_concept'][shape][key]):>{width}s}" for m in methods.values()))
    for shape in next(iter(methods.values()))["remaining"]:
        lines.append(f"{f'{shape} (not erased) right':34s}"
                     + "".join(f"{cell(m['remaining_rates'][shape]):>{width}s}" for m in methods.values()))
    for shape in next(iter(methods.values())).get("remaining_paraphrase_rates", {}):
        lines.append(f"{f'{shape} paraphrases right':34s}"
                     + "".join(f"{cell(m['remaining_paraphrase_rates'][shape]):>{width}s}" for m in methods.values()))
    changes = [m.get("remaining_change", {}).get("all") for m in methods.values()]
    if any(changes):
        lines.append(f"{'not erased: change from the original':34s}"
                     + "".join(f"{'' if c is None else stats.points(c):>{width}s}" for c in changes))
    return "\n".join(lines + _preserved_line(report["settings"]))


def _preserved_line(settings: dict) -> list[str]:
    """The report's warning when a preservation term kept prompts: what they name was seen."""
    preserved = settings.get("preserved")
    return ([f"kept by the preservation term (seen by the erasure, a departure): {'; '.join(preserved)}"]
            if preserved else [])


# Offset of the quality check's seeds inside a split's range (the judging rows start at its base).
QUALITY_SEED_OFFSET = 500_000


def world_quality(bundle, config_report, images_per_shape: int, progress: bool = True) -> dict:
    """Is a world fit to judge erasures in? (#21's must-show for a new world.)

    * ``draws``: per shape, the fraction of images from "a <colour> <shape>" (colours in turn, every
      image its own seed in ``report.split``'s range) that the judge calls that shape *and* colour;
    * ``judge``: the judge's accuracy (shape and colour) on fresh renders of random scenes, and
      whether it calls empty canvases "none"."""
    judge = Judge(presets.source_folder(bundle.source))
    of_world = judge.world
    rows = rows_of_groups([(s, [(f"a {c} {s}", s, c) for c in world.COLOURS]) for s in of_world.shapes],
                          images_per_shape, config_report.split, first_seed=QUALITY_SEED_OFFSET)
    base = rows[0].seed
    sampler = Sampler(bundle, config_report.steps, config_report.guidance_scale, batch_size=64)
    images = sampler([r.prompt for r in rows], [r.seed for r in rows], progress=progress, desc="drawing every shape")
    right = drawn_right(rows, *judge(images))
    draws = {shape: stats.rate(right[[r.label == shape for r in rows]]) for shape in of_world.shapes}
    rng = np.random.default_rng(base)
    scenes = world.random_scenes(rng, 100 * len(of_world.shapes), of_world.shapes)
    shapes, colours = judge(world.render_many(scenes, rng))
    empty = judge(np.full((16, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), world.BACKGROUND, np.uint8))[0]
    return {"world": of_world.name, "draws": draws, "draws_all": stats.rate(right),
            "judge_on_renders": stats.rate([(s == sc.shape) and (c == sc.colour)
                                            for s, c, sc in zip(shapes, colours, scenes)]),
            "judge_empty_is_none": stats.rate(empty == "none"),
            "settings": {"images_per_shape": images_per_shape, "split": config_report.split, "seeds_from": base,
                         "steps": config_report.steps, "guidance_scale": config_report.guidance_scale}}


def format_quality(quality: dict) -> str:
    lines = [f"world {quality['world']}: the shape and colour asked for, judged", "",
             "| shape | drawn right |", "|---|---|"]
    lines += [f"| {shape} | {stats.percent(r)} |" for shape, r in quality["draws"].items()]
    lines += [f"| all | {stats.percent(quality['draws_all'])} |", "",
              f"judge on fresh renders: {stats.percent(quality['judge_on_renders'])}; "
              f"empty canvases called none: {stats.percent(quality['judge_empty_is_none'])}"]
    return "\n".join(lines)


def _grid_columns(images: dict[str, np.ndarray], shape: str, of_world: world.World) -> list[tuple[str, np.ndarray]]:
    """Rows of the grid for one model: (label, GRID_SEEDS images of that prompt side by side). A
    group's images take its prompts in turn, so prompt i's are images i, i + P, i + 2P, ..."""
    rows = []
    paraphrases = of_world.paraphrases[shape]
    for name, prompts in prompt_sets(shape, of_world).items():
        group = images["named" if name == shape else name]
        for i, (prompt, _, colour) in enumerate(prompts):
            paraphrase_index = i % len(paraphrases)
            if name == "paraphrase" and paraphrase_index != world.COLOURS.index(colour) % len(paraphrases):
                continue  # one paraphrase per colour (a different one each) keeps the grid readable
            own = group[i::len(prompts)][:GRID_SEEDS]
            if len(own):
                rows.append((prompt, np.concatenate(list(own), axis=1)))
    return rows


def _grid_image(grids: dict[str, list[tuple[str, np.ndarray]]], shape: str, of_world: world.World) -> Image.Image:
    """Prompts down the side, one column block per model (GRID_SEEDS seeds each), headers on top."""
    label_w, gap, header = 150, 12, 20
    names = list(grids)
    rows = grids[names[0]]
    cell_h, block_w = (np.asarray(rows[0][1].shape[:2]) * GRID_SCALE)
    width = label_w + len(names) * (block_w + gap)
    height = header + len(rows) * (cell_h + 4)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for m, name in enumerate(names):
        draw.text((label_w + m * (block_w + gap) + 4, 4), name.replace("_", " "), fill=(0, 0, 0))
        for r, (prompt, strip) in enumerate(grids[name]):
            tile = Image.fromarray(strip).resize((block_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + m * (block_w + gap), header + r * (cell_h + 4)))
    for r, (prompt, _) in enumerate(rows):
        colour = (180, 0, 0) if shape in prompt or any(p in prompt for p in of_world.paraphrases[shape]) else (0, 0, 0)
        draw.text((4, header + r * (cell_h + 4) + cell_h // 2 - 5), prompt, fill=colour)
    return canvas


def format_table(report: dict) -> str:
    shape = report["concept"]
    methods = report["methods"]
    others = [key[:-len("_right")] for m in list(methods.values())[:1] for key in m["rates"]
              if key.endswith("_right") and key != "others_right" and key[:-len("_right")] != shape]
    settings = report["settings"]
    lines = [f"erasing '{shape}' on the small world: % of images [95 % interval] (k/n); {settings['split']} seeds "
             f"{settings['seeds'][0]}..{settings['seeds'][1]}, the same for every model"]
    rows = [(f"shows a {shape}: prompts naming it", lambda m: stats.percent(m["rates"]["named"])),
            (f"shows a {shape}: paraphrases", lambda m: stats.percent(m["rates"]["paraphrase"])),
            ("other shapes drawn right", lambda m: stats.percent(m["rates"]["others_right"])),
            ("  change from the original", lambda m: stats.points(m.get("other_change"))),
            *[(f"  {s} drawn right", lambda m, s=s: stats.percent(m["rates"][f"{s}_right"])) for s in others],
            (f"clean pictures: {shape} prompts", lambda m: stats.percent(m["coherence"]["named"])),
            ("clean pictures: paraphrases", lambda m: stats.percent(m["coherence"]["paraphrase"]))]
    for name, m in methods.items():
        lines.append(f"{name}:")
        lines += [f"  {label:36s} {cell(m)}" for label, cell in rows]
    return "\n".join(lines + _preserved_line(settings))
