"""`coerase sweep`: cells from the grid, a kill mid-way resumes without redoing finished cells, one table."""

import csv
from pathlib import Path

import jax
import pytest

from coerase_jax.configuration import load_config
from coerase_jax.erase.sweep import plan_cells, run_sweep
from coerase_jax.errors import UserError
from coerase_jax.parallel.mesh import make_mesh

REPO = Path(__file__).resolve().parent.parent


class Killed(Exception):
    pass


def _config(**sweep):
    config = load_config(str(REPO / "configs" / "sweep_tiny.py"),
                         ["--config.text_stage.steps=3", "--config.erase.ddim_steps=4", "--config.checkpoint.every=1"])
    with config.unlocked():
        for key, value in sweep.items():
            config.sweep[key] = value
    return config


def test_the_grid_makes_one_cell_per_combination():
    cells = plan_cells(_config())  # 2 concepts x 2 learning rates
    assert [c.name for c in cells] == ["circle_learning_rate=1e-05", "circle_learning_rate=0.0001",
                                       "square_learning_rate=1e-05", "square_learning_rate=0.0001"]
    assert cells[2].prompts == ("a blue square", "a square")
    with pytest.raises(UserError, match="sweep.concepts is empty"):
        plan_cells(_config(concepts=()))
    with pytest.raises(UserError, match="must be"):
        plan_cells(_config(grid=(("erase.eta", ()),)))


def test_a_killed_sweep_resumes_without_redoing_finished_cells(tiny_bundle, tmp_path):
    config = _config(grid=(("text_stage.learning_rate", (1e-4,)),))
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    seen = []

    def kill_in_second_cell(cell, stage, step, metrics):
        seen.append((cell, step))
        if cell.startswith("square") and step == 2:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(config, tiny_bundle, tmp_path, progress=False, mesh=mesh, on_step=kill_in_second_cell)
    assert [s for c, s in seen if c.startswith("circle")] == [1, 2, 3]
    first_table = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [row["cell"] for row in first_table] == ["circle_learning_rate=0.0001"]  # written as cells finish

    seen.clear()
    rows = run_sweep(config, tiny_bundle, tmp_path, progress=False, mesh=mesh,
                     on_step=lambda cell, stage, step, m: seen.append((cell, step)))
    # circle skipped; square resumed from its last checkpoint, step 1 (the kill came before step 2's save)
    assert seen == [("square_learning_rate=0.0001", 2), ("square_learning_rate=0.0001", 3)]
    assert [r["concept"] for r in rows] == ["circle", "square"] and all(r["loss_text"] > 0 for r in rows)
    table = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [row["text_stage.learning_rate"] for row in table] == ["0.0001", "0.0001"]
    assert (tmp_path / "sweep.md").read_text().startswith("| cell | concept | text_stage.learning_rate | loss_text |")
