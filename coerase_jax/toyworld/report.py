"""What an erasure did on the small world: the judge's verdict before and after, as numbers and a grid.

For the erased shape S and every model compared (original, text stage only, Co-Erasing):

* ``erased_rate_named``: fraction of images from "a <colour> S" classified as S;
* ``erased_rate_paraphrase``: the same for S's paraphrases ("a <colour> disc", ...), which the
  erasure prompts never contain;
* ``per_shape``: for every shape T, the fraction of images from "a <colour> T" classified as T
  *and* that colour (the shipped model's own accuracy is this figure for the original);
* ``other_accuracy``: the mean of ``per_shape`` over the shapes other than S.

Every model sees the same prompts and the same seeds, so the differences are paired.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.errors import UserError
from coerase_jax.models import presets
from coerase_jax.parallel import distributed
from coerase_jax.toyworld import world
from coerase_jax.toyworld.classifier import Judge

GRID_SEEDS = 4
GRID_SCALE = 2


def prompt_sets(shape: str) -> dict[str, list[tuple[str, str, str]]]:
    """Named, paraphrase and per-shape prompt lists of (prompt, shape it names, colour)."""
    if shape not in world.SHAPES:
        raise UserError(f"the small world has no shape {shape!r} (shapes: {', '.join(world.SHAPES)})")
    named = lambda s: [(f"a {c} {world.NAMES[s]}", s, c) for c in world.COLOURS]
    sets = {shape: named(shape),
            "paraphrase": [(f"a {c} {p}", shape, c) for c in world.COLOURS for p in world.PARAPHRASES[shape]]}
    sets.update({s: named(s) for s in world.SHAPES if s != shape})
    return sets


def evaluate(sampler: Sampler, judge: Judge, unet_params, shape: str, images_per_prompt: int, seed: int,
             progress: bool = True, name: str = "") -> tuple[dict, dict[str, np.ndarray]]:
    """One model's figures, and its images per prompt set (all sets sampled in one batched pass)."""
    sets = prompt_sets(shape)
    jobs = [(set_name, p, s, c, seed + k) for set_name, prompts in sets.items() for p, s, c in prompts
            for k in range(images_per_prompt)]
    images = sampler([j[1] for j in jobs], [j[4] for j in jobs], unet_params=unet_params, progress=progress,
                     desc=f"judging {name}".strip())
    got_shape, got_colour = judge(images)
    set_of = np.asarray([j[0] for j in jobs], object)
    right = (got_shape == np.asarray([j[2] for j in jobs], object)) & (
        got_colour == np.asarray([j[3] for j in jobs], object))
    shows_concept = got_shape == shape
    figures = {"erased_rate_named": float(np.mean(shows_concept[set_of == shape])),
               "erased_rate_paraphrase": float(np.mean(shows_concept[set_of == "paraphrase"])),
               "per_shape": {s: float(np.mean(right[set_of == s])) for s in world.SHAPES},
               "images": {set_name: int(np.sum(set_of == set_name)) for set_name in sets}}
    figures["other_accuracy"] = float(np.mean([figures["per_shape"][s] for s in world.SHAPES if s != shape]))
    return figures, {set_name: images[set_of == set_name] for set_name in sets}


def compare(bundle, models: dict[str, dict], shape: str, config_report, out_dir: str | Path,
            progress: bool = True) -> dict:
    """Evaluates each named UNet, writes ``report.json`` and ``grid.png`` to ``out_dir``; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = Judge(presets.source_folder(bundle.source))
    sampler = Sampler(bundle, config_report.steps, config_report.guidance_scale, batch_size=64)
    methods, grids = {}, {}
    for name, params in models.items():
        methods[name], images = evaluate(sampler, judge, params, shape, config_report.images_per_prompt,
                                         config_report.seed, progress, name)
        grids[name] = _grid_columns(images, config_report.images_per_prompt, shape)
    report = {"concept": shape, "methods": methods,
              "settings": {"images_per_prompt": config_report.images_per_prompt, "steps": config_report.steps,
                           "guidance_scale": config_report.guidance_scale, "seed": config_report.seed}}
    if distributed.is_leader():
        tmp = out_dir / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out_dir / "report.json")
        _grid_image(grids, shape).save(out_dir / "grid.png")
    return report


def compare_joint(bundle, models: dict[str, dict], shapes: list[str], config_report, out_dir: str | Path,
                  progress: bool = True) -> dict:
    """A joint erasure of several shapes: for each erased shape its named/paraphrase rates, and the
    accuracy on every shape that was not erased; writes ``report.json``."""
    out_dir = Path(out_dir)
    judge = Judge(presets.source_folder(bundle.source))
    sampler = Sampler(bundle, config_report.steps, config_report.guidance_scale, batch_size=64)
    remaining = [s for s in world.SHAPES if s not in shapes]
    methods = {}
    for name, params in models.items():
        per_concept = {}
        for shape in shapes:
            figures, _ = evaluate(sampler, judge, params, shape, config_report.images_per_prompt, config_report.seed,
                                  progress, f"{name} ({shape})")
            per_concept[shape] = {k: figures[k] for k in ("erased_rate_named", "erased_rate_paraphrase")}
        methods[name] = {"per_concept": per_concept, "remaining": {s: figures["per_shape"][s] for s in remaining},
                         "remaining_accuracy": (float(np.mean([figures["per_shape"][s] for s in remaining]))
                                                if remaining else None)}
    report = {"concepts": list(shapes), "methods": methods,
              "settings": {"images_per_prompt": config_report.images_per_prompt, "steps": config_report.steps,
                           "guidance_scale": config_report.guidance_scale, "seed": config_report.seed}}
    if distributed.is_leader():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out_dir / "report.json")
    return report


def format_joint_table(report: dict) -> str:
    methods = report["methods"]
    lines = [f"joint erasure of {', '.join(report['concepts'])} on the small world (fraction of images)",
             f"{'':34s}" + "".join(f"{name:>14s}" for name in methods)]
    for shape in report["concepts"]:
        for key, label in (("erased_rate_named", "named"), ("erased_rate_paraphrase", "paraphrases")):
            lines.append(f"{f'shows a {shape}: {label}':34s}"
                         + "".join(f"{m['per_concept'][shape][key]:14.3f}" for m in methods.values()))
    for shape in next(iter(methods.values()))["remaining"]:
        lines.append(f"{f'{shape} (not erased) right':34s}" + "".join(f"{m['remaining'][shape]:14.3f}"
                                                                     for m in methods.values()))
    return "\n".join(lines)


def _grid_columns(images: dict[str, np.ndarray], per_prompt: int, shape: str) -> list[tuple[str, np.ndarray]]:
    """Rows of the grid for one model: (label, GRID_SEEDS images side by side)."""
    rows, seeds = [], min(GRID_SEEDS, per_prompt)
    for name, prompts in prompt_sets(shape).items():
        for i, (prompt, _, colour) in enumerate(prompts):
            paraphrase_index = i % len(world.PARAPHRASES[shape])
            if name == "paraphrase" and paraphrase_index != world.COLOURS.index(colour) % len(world.PARAPHRASES[shape]):
                continue  # one paraphrase per colour (a different one each) keeps the grid readable
            start = i * per_prompt
            rows.append((prompt, np.concatenate(list(images[name][start:start + seeds]), axis=1)))
    return rows


def _grid_image(grids: dict[str, list[tuple[str, np.ndarray]]], shape: str) -> Image.Image:
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
        colour = (180, 0, 0) if shape in prompt or any(p in prompt for p in world.PARAPHRASES[shape]) else (0, 0, 0)
        draw.text((4, header + r * (cell_h + 4) + cell_h // 2 - 5), prompt, fill=colour)
    return canvas


def format_table(report: dict) -> str:
    shape = report["concept"]
    methods = report["methods"]
    others = [s for s in world.SHAPES if s != shape]
    lines = [f"erasing '{shape}' on the small world (fraction of images; same prompts and seeds for every model)",
             f"{'':34s}" + "".join(f"{name:>14s}" for name in methods)]
    rows = [(f"shows a {shape}: prompts naming it", "erased_rate_named"),
            (f"shows a {shape}: paraphrases", "erased_rate_paraphrase"),
            ("other shapes right (mean)", "other_accuracy")]
    for label, key in rows:
        lines.append(f"{label:34s}" + "".join(f"{m[key]:14.3f}" for m in methods.values()))
    for s in others:
        lines.append(f"{'  ' + s + ' right':34s}" + "".join(f"{m['per_shape'][s]:14.3f}" for m in methods.values()))
    counts = next(iter(methods.values()))["images"]
    lines.append(f"images per model: {shape} {counts[shape]}, paraphrases {counts['paraphrase']}, "
                 + ", ".join(f"{s} {counts[s]}" for s in others))
    return "\n".join(lines)
