"""The ``coerase`` command: sample writes images, grid and manifest; bad config keys are one-line errors."""

import json

import pytest
from PIL import Image

from coerase_jax.cli import main


def test_sample_writes_pngs_grid_and_manifest(tmp_path):
    out = tmp_path / "samples"
    code = main(["sample", "--config", "configs/tiny.py", "--prompt", "a red circle", "--prompt", "a blue square",
                 "--out", str(out), "--config.sample.steps=2", "--config.sample.num_images_per_prompt=2"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["prompt"] for m in manifest["images"]] == ["a red circle", "a blue square"] * 2
    assert len({m["seed"] for m in manifest["images"]}) == 4
    for entry in manifest["images"]:
        assert Image.open(out / entry["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size == (64, 64)
    assert manifest["config"]["sample"]["steps"] == 2


def test_unknown_config_key_is_a_one_line_error(tmp_path, capsys):
    code = main(["sample", "--out", str(tmp_path), "--config.sample.stepz=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "coerase: error: unknown config key 'sample.stepz' (did you mean sample.steps, " \
                                "sample.seed, sample?)"


def test_badly_typed_override_is_a_one_line_error(tmp_path, capsys):
    code = main(["sample", "--out", str(tmp_path), "--config.sample.steps=many"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--config.sample.steps" in err and "int" in err


def test_eval_without_a_prompt_file_or_with_an_unfinished_run_is_a_one_line_error(tmp_path, capsys):
    code = main(["eval", "--config", "configs/tiny.py", "--out", str(tmp_path / "e")])
    assert code == 2 and "eval.prompts is not set" in capsys.readouterr().err
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n0,a cat,1\n")
    code = main(["eval", "--config", "configs/tiny.py", "--run", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "e"), f"--config.eval.prompts={csv}"])
    assert code == 2 and "not a run directory" in capsys.readouterr().err


@pytest.mark.slow  # (50-130 s, compile-bound; the joint analysis is tested by hand in test_frontier.py)
def test_a_joint_frontier_trains_judges_and_marks_its_points(tmp_path, capsys):
    """`coerase frontier` on a joint erasure, end to end at toy size: references per concept, every
    point trained, each model judged once as the joint report is, frontier.md printed and written;
    a rerun judges nothing again (its kept verdicts)."""
    out = tmp_path / "frontier"
    args = ["frontier", "--config", "configs/frontier_joint.py", "--out", str(out),
            "--config.frontier.iterations=2", "--config.report.images_per_group=2", "--config.report.split=dev",
            "--config.report.steps=2", "--config.data.num_references=2", "--config.data.reference_steps=2",
            "--config.erase.ddim_steps=2",
            "--config.frontier.methods=(('tiny', (('text_stage.steps', 1), ('image_stage.steps', 1)), "
            "(('text_stage.learning_rate', (1e-4, 2e-4)),)),)"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for shape in ("circle", "square", "triangle"):
        assert len(list((out / "references" / shape).glob("*.png"))) == 2
    frontier = json.loads((out / "frontier.json").read_text())
    assert [p["name"] for p in frontier["points"]] == ["tiny_text_lr=0.0001", "tiny_text_lr=0.0002"]
    assert frontier["settings"]["images_per_group"] == 2 and frontier["concepts"] == ["circle", "square", "triangle"]
    assert set(frontier["original"]["held"]) == {"cross", "star", "diamond"}
    kept = sorted(p.name for p in (out / "eval").glob("verdicts-*/*.npz"))
    assert kept == ["original.npz", "tiny_text_lr=0.0001.npz", "tiny_text_lr=0.0002.npz"]
    assert "| tiny_text_lr=0.0002 |" in printed and (out / "frontier.md").read_text() in printed
    assert main(args) == 0 and "judging" not in capsys.readouterr().err
