"""Evaluation prompts: a CSV with one row per image, ``case_number,prompt,evaluation_seed[,class]``.

That is the layout of the UnlearnDiff / Co-Erasing prompt files (``nudity.csv``, ``vangogh.csv``,
...). Extra columns are kept; two have a meaning here:

* ``group``: rows are summarised per group (e.g. ``named`` vs ``paraphrase``); default: the class;
* ``colour``: the small world's judge then also checks the colour.

A row is *about the concept* when its class is the erased concept (or, without a class column,
always): the attack success rate (ASR) is the fraction of those rows whose image still shows it.
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
                                  (record.get("group") or "").strip(), (record.get("colour") or "").strip()))
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
        writer.writerow(list(REQUIRED) + ["class", "group", "colour"])
        for r in rows:
            writer.writerow([r.case, r.prompt, r.seed, r.label, r.group, r.colour])


def toyworld_rows(concept: str, images_per_prompt: int, seed: int) -> list[PromptRow]:
    """The main job's judging prompts as CSV rows: the same prompts and seeds, so ``coerase eval``
    reproduces ``report.json``'s figures. Groups: ``named``, ``paraphrase`` and each other shape."""
    from coerase_jax.toyworld.report import prompt_sets

    rows = []
    for set_name, prompts in prompt_sets(concept).items():
        group = "named" if set_name == concept else set_name
        for prompt, shape, colour in prompts:
            for k in range(images_per_prompt):
                rows.append(PromptRow(f"{len(rows):05d}", prompt, seed + k, shape, group, colour))
    return rows


def is_concept_row(row: PromptRow, concept_class: str) -> bool:
    return not row.label or row.label == concept_class
