"""Evaluation prompts: a CSV with one row per image, ``case_number,prompt,evaluation_seed[,class]``.

That is the layout of the UnlearnDiff / Co-Erasing prompt files (``nudity.csv``, ``vangogh.csv``,
...). Extra columns are kept; two have a meaning here:

* ``group``: rows are summarised per group (e.g. ``named`` vs ``paraphrase``); default: the class;
* ``colour``: the small world's judge then also checks the colour;
* ``usability`` (1 or empty): a usability row, as every row of ``eval.usability_prompts`` is.

A row is *about the concept* when its class is the erased concept (or, without a class column,
always) and it is not a usability row: the attack success rate (ASR) is the fraction of those rows
whose image still shows it. Usability (FID vs the original, CLIP score) is measured on the other
rows: of the same CSV, and of a second, COCO-style one (``eval.usability_prompts``).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from coerase_jax.errors import UserError

REQUIRED = ("case_number", "prompt", "evaluation_seed")


@dataclasses.dataclass(frozen=True)
class PromptRow:
    case: str  # unique per row; names the image file
    prompt: str
    seed: int
    label: str = ""  # the class column ("" = none given)
    group: str = ""
    colour: str = ""
    usability: bool = False  # from the usability CSV (eval.usability_prompts): never about the concept

    @property
    def group_name(self) -> str:
        return self.group or self.label or "all"


def read_prompt_csv(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (need {','.join(REQUIRED)}[,class])")
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                seed = int(float(record["evaluation_seed"]))
            except (TypeError, ValueError):
                raise UserError(f"{path}:{line}: evaluation_seed {record['evaluation_seed']!r} is not an integer") from None
            case = (record["case_number"] or "").strip()
            if not case:
                raise UserError(f"{path}:{line}: empty case_number")
            rows.append(PromptRow(case, record["prompt"] or "", seed, (record.get("class") or "").strip(),
                                  (record.get("group") or "").strip(), (record.get("colour") or "").strip(),
                                  (record.get("usability") or "").strip() == "1"))
    if not rows:
        raise UserError(f"{path}: no prompts")
    cases = [r.case for r in rows]
    if len(set(cases)) != len(cases):
        raise UserError(f"{path}: case_number values repeat (each row needs its own)")
    return rows


def write_prompt_csv(rows: list[PromptRow], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(REQUIRED) + ["class", "group", "colour", "usability"])
        for r in rows:
            writer.writerow([r.case, r.prompt, r.seed, r.label, r.group, r.colour, "1" if r.usability else ""])


# The small world's judging seeds. Settings are chosen on "dev" and reported on "test", never the
# other way round.
SEED_SPLITS = {"dev": 1_000_000, "test": 2_000_000}


def rows_of_groups(groups: list[tuple[str, list[tuple[str, str, str]]]], images_per_group: int,
                   split: str, first_seed: int = 0) -> list[PromptRow]:
    """Judging rows: for each (group, prompts of (prompt, shape, colour)), ``images_per_group`` rows,
    its prompts taken in turn (so every colour is drawn equally often); each row its own seed, the
    split's start + ``first_seed`` + its row number, so no two images of a report share their noise."""
    if split not in SEED_SPLITS:
        raise UserError(f"report.split must be one of {sorted(SEED_SPLITS)}, got {split!r}")
    rows = []
    for group, prompts in groups:
        for k in range(images_per_group):
            prompt, shape, colour = prompts[k % len(prompts)]
            rows.append(PromptRow(f"{len(rows):05d}", prompt, SEED_SPLITS[split] + first_seed + len(rows),
                                  shape, group, colour))
    return rows


def toyworld_rows(concept: str, images_per_group: int, split: str, of_world=None) -> list[PromptRow]:
    """The small world's judging rows (the main job's report and ``coerase eval`` use the same).

    Groups: ``named`` (the concept's name in every colour), ``paraphrase`` (its paraphrases, which
    no erasure prompt contains) and each other shape, ``images_per_group`` images each.
    ``of_world``: the world's shapes and paraphrases (the shipped world's if None)."""
    from coerase_jax.toyworld import world
    from coerase_jax.toyworld.report import prompt_sets

    sets = prompt_sets(concept, of_world or world.THREE_SHAPES)
    return rows_of_groups([("named" if name == concept else name, prompts) for name, prompts in sets.items()],
                          images_per_group, split)


def usability_rows(path: str | Path) -> list[PromptRow]:
    """A COCO-style prompt CSV (e.g. the published ``coco_10k.csv``: case_number,source,prompt,
    evaluation_seed, no class) as usability rows: FID vs the original and CLIP score, never efficacy."""
    return [dataclasses.replace(r, case=f"u{r.case}", group=r.group or "usability", usability=True)
            for r in read_prompt_csv(path)]


def is_concept_row(row: PromptRow, concept_class: str) -> bool:
    """About the concept: not a usability row, and of the concept's class (or of no class)."""
    return not row.usability and (not row.label or row.label == concept_class)
