"""A sweep: a grid of erasures (concepts x settings) from one command, resumable, with one table.

    coerase sweep --config configs/sweep_toyworld.py --out runs/sweep

``sweep.concepts`` is a tuple of (concept name, prompts) and ``sweep.grid`` a tuple of (dotted
config key, values); every combination is a cell, an ordinary erasure run in
``out/cells/<cell>/`` (the prompts are also the cell's reference prompts). A cell whose stages are
all finished is skipped, and an interrupted one resumes from its checkpoints, so rerunning the
command after a kill redoes nothing that was done. After each cell ``out/sweep.csv`` and
``out/sweep.md`` are rewritten: each cell's final losses, and with ``report.kind = "toyworld"`` and
``sweep.report`` its efficacy and usability figures from the small world's judge. ``out/timing.json``
says how long this invocation spent training (judging excluded) and so how many concepts an hour.

With ``sweep.batch_concepts`` (default on), the unfinished cells of one setting — the concepts
of one grid point — train side by side in one program (``erase/batched_trainer.py``: stacked on
the mesh's ``concept`` axis) when their trainable part is small enough to stack; each still ends
up an ordinary finished run in its own folder. Other cells run one after another.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from coerase_jax.configuration import OVERRIDE_PREFIX, apply_overrides
from coerase_jax.erase.trainer import plan_stages, run_erasure, stage_done
from coerase_jax.errors import UserError
from coerase_jax.parallel import distributed

FIGURES = ("erased_rate_named", "erased_rate_paraphrase", "other_accuracy")


@dataclasses.dataclass(frozen=True)
class Cell:
    concept: str
    prompts: tuple[str, ...]
    settings: tuple[tuple[str, Any], ...]  # (dotted config key, value)

    @property
    def name(self) -> str:
        parts = [self.concept] + [f"{key.split('.')[-1]}={value}" for key, value in self.settings]
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "_".join(parts))


def plan_cells(config) -> list[Cell]:
    concepts, grid = tuple(config.sweep.concepts), tuple(config.sweep.grid)
    if not concepts:
        raise UserError("sweep.concepts is empty: give (name, prompts) pairs")
    for entry in concepts:
        if len(entry) != 2 or isinstance(entry[1], str) or not entry[1]:
            raise UserError(f"sweep.concepts entry {entry!r} must be (name, (prompt, ...))")
    for entry in grid:
        if len(entry) != 2 or isinstance(entry[1], str) or not len(entry[1]):
            raise UserError(f"sweep.grid entry {entry!r} must be (dotted.key, (value, ...))")
    keys = [key for key, _ in grid]
    cells = [Cell(name, tuple(prompts), tuple(zip(keys, values)))
             for name, prompts in concepts for values in itertools.product(*[v for _, v in grid])]
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise UserError("two sweep cells share a name (repeated concept or grid value)")
    return cells


def cell_config(config, cell: Cell, out: Path):
    """The sweep's config with the cell's concept, settings and run directory."""
    cfg = config.copy_and_resolve_references()
    overrides = [f"{OVERRIDE_PREFIX}concept.name={cell.concept}", f"{OVERRIDE_PREFIX}concept.prompts={cell.prompts!r}",
                 f"{OVERRIDE_PREFIX}concept.reference_prompts={cell.prompts!r}",
                 f"{OVERRIDE_PREFIX}run_dir={out / 'cells' / cell.name}"]
    overrides += [f"{OVERRIDE_PREFIX}{key}={value!r}" for key, value in cell.settings]
    return apply_overrides(cfg, overrides)


def summarise(cell: Cell, cfg) -> dict:
    run_dir = Path(cfg.run_dir)
    row = {"cell": cell.name, "concept": cell.concept, **{key: value for key, value in cell.settings}}
    for stage in plan_stages(cfg):
        done = run_dir / f"stage_{stage.name}" / "done.json"
        row[f"loss_{stage.name}"] = json.loads(done.read_text())["final_loss"] if done.is_file() else None
    report = run_dir / "report.json"
    if report.is_file():
        final = json.loads(report.read_text())["methods"]
        method = "co_erasing" if "co_erasing" in final else list(final)[-1]
        row.update({f: final[method][f] for f in FIGURES})
        row["original_other_accuracy"] = final["original"]["other_accuracy"]
    return row


def write_table(rows: list[dict], out: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    for name, content in (("sweep.csv", text.getvalue()), ("sweep.md", "\n".join(md) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out / name)


def run_sweep(config, bundle, out: str | Path, progress: bool = True, mesh=None,
              on_step: Callable | None = None, report: Callable | None = None) -> list[dict]:
    """Runs (or skips, or resumes) every cell in order; returns the table's rows.

    ``report(cfg, run_dir)`` judges a finished cell (called only when its report.json is missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(config)
    side_by_side, alone, train_seconds = 0, 0, 0.0
    if config.sweep.batch_concepts:
        start = time.perf_counter()
        side_by_side = _run_batched_groups(config, cells, bundle, out, progress, mesh, on_step)
        train_seconds = time.perf_counter() - start
    rows = []
    for i, cell in enumerate(cells):
        cfg = cell_config(config, cell, out)
        finished = all(stage_done(stage, Path(cfg.run_dir)) for stage in plan_stages(cfg))
        print(f"[sweep] cell {i + 1}/{len(cells)} {cell.name}: {'finished, skipped' if finished else 'running'}",
              flush=True)
        if not finished:
            start = time.perf_counter()
            run_erasure(cfg, bundle, progress, mesh,
                        on_step=None if on_step is None else lambda *a, name=cell.name: on_step(name, *a))
            alone, train_seconds = alone + 1, train_seconds + time.perf_counter() - start
        if report is not None and not (Path(cfg.run_dir) / "report.json").is_file():
            report(cfg, Path(cfg.run_dir))
        rows.append(summarise(cell, cfg))
        if distributed.is_leader():
            write_table(rows, out)
    if side_by_side + alone and distributed.is_leader():
        write_timing(out, side_by_side, alone, train_seconds)
    return rows


def write_timing(out: Path, side_by_side: int, alone: int, train_seconds: float) -> None:
    """This invocation's training time (compiling included, judging not): the concepts-per-hour figure."""
    trained = side_by_side + alone
    timing = {"cells_trained": trained, "cells_side_by_side": side_by_side, "train_seconds": round(train_seconds, 2),
              "concepts_per_hour": round(3600 * trained / train_seconds, 2)}
    print(f"[sweep] trained {trained} cells ({side_by_side} side by side) in {train_seconds:.0f}s: "
          f"{timing['concepts_per_hour']:.1f} concepts an hour", flush=True)
    tmp = out / ".timing.json.tmp"
    tmp.write_text(json.dumps(timing, indent=1) + "\n")
    tmp.replace(out / "timing.json")


def _run_batched_groups(config, cells: list[Cell], bundle, out: Path, progress, mesh, on_step) -> int:
    """Trains the unfinished cells of each grid point side by side, where they can be; returns how many."""
    from coerase_jax.erase.batched_trainer import run_batched, why_not_batched

    groups: dict[tuple, list[Cell]] = {}
    trained = 0
    for cell in cells:
        groups.setdefault(cell.settings, []).append(cell)
    for settings, group in groups.items():
        cfgs = [cell_config(config, cell, out) for cell in group]
        todo = [(cell, cfg) for cell, cfg in zip(group, cfgs)
                if not all(stage_done(stage, Path(cfg.run_dir)) for stage in plan_stages(cfg))]
        if len(todo) < 2:
            continue
        reason = why_not_batched([cfg for _, cfg in todo], mesh)
        label = "_".join(f"{key.split('.')[-1]}={value}" for key, value in settings) or "all"
        if reason:
            print(f"[sweep] {label}: {len(todo)} cells one after another ({reason})", flush=True)
            continue
        print(f"[sweep] {label}: {len(todo)} cells side by side ({', '.join(c.name for c, _ in todo)})", flush=True)
        names = {cfg.run_dir: cell.name for cell, cfg in todo}
        run_batched([cfg for _, cfg in todo], bundle, out / "batched" / re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label),
                    progress, mesh, None if on_step is None else lambda run_dir, *a: on_step(names[run_dir], *a))
        trained += len(todo)
    return trained
