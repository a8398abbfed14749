"""Images for evaluation: one per prompt row, batched (and sharded, with a mesh), resumable.

Each image is written as ``<case>.png`` (to a temporary name, then renamed), and only then is its
line appended to ``manifest.jsonl``. A rerun reads the manifest and generates just the rows that
are missing, so an interrupted evaluation loses at most the chunk in flight. With several hosts
the folder must be shared: process 0 writes, every process reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.errors import UserError
from coerase_jax.evaluate.prompts import PromptRow
from coerase_jax.parallel import distributed

MANIFEST = "manifest.jsonl"
BATCHES_PER_CHUNK = 4  # images written (and the manifest extended) after this many sampler batches


def finished_cases(folder: Path, rows: list[PromptRow]) -> set[str]:
    """Cases already generated for these rows; a manifest written for other prompts is an error."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return set()
    wanted = {r.case: r for r in rows}
    done = set()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption: that image is simply generated again
        row = wanted.get(entry.get("case"))
        if row is None or entry.get("prompt") != row.prompt or entry.get("seed") != row.seed:
            raise UserError(f"{folder} holds images of other prompts or seeds (case {entry.get('case')!r}); "
                            f"use a new output folder")
        if (folder / entry["file"]).is_file():
            done.add(row.case)
    return done


def _save(image: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)


def generate(sampler: Sampler, rows: list[PromptRow], folder: str | Path, unet_params=None,
             name: str = "") -> np.ndarray:
    """(N, H, W, 3) uint8 images for ``rows`` (in order), generating only those not yet in ``folder``."""
    folder = Path(folder)
    leader = distributed.is_leader()
    if leader:
        folder.mkdir(parents=True, exist_ok=True)
    done = finished_cases(folder, rows)
    distributed.barrier("evaluation manifest read")
    todo = [r for r in rows if r.case not in done]
    if done:
        print(f"{name or folder}: {len(done)} of {len(rows)} images already generated, {len(todo)} to go")
    manifest = folder / MANIFEST
    # after a line cut short by an interruption, start a new line rather than extend it
    cut = leader and manifest.is_file() and manifest.stat().st_size and not manifest.read_bytes().endswith(b"\n")
    chunk = sampler.batch_size * BATCHES_PER_CHUNK
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        images = sampler([r.prompt for r in part], [r.seed for r in part], unet_params=unet_params,
                         desc=f"generating {name} {start + len(part)}/{len(todo)}".strip())
        if leader:
            lines = []
            for row, image in zip(part, images):
                _save(image, folder / f"{row.case}.png")
                lines.append(json.dumps({"case": row.case, "prompt": row.prompt, "seed": row.seed,
                                         "file": f"{row.case}.png"}))
            with manifest.open("a", encoding="utf-8") as handle:
                handle.write("\n" * bool(cut) + "\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            cut = False
    distributed.barrier("evaluation images written")
    return np.stack([np.asarray(Image.open(folder / f"{r.case}.png").convert("RGB")) for r in rows])
