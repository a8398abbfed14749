"""Restarting fast and safely: the compilation cache, and the one-shot accelerator check (CPU rehearsal)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from coerase_jax import compile_cache

REPO = Path(__file__).resolve().parent.parent


def test_the_cache_folder_follows_environment_then_config_then_the_default(tmp_path):
    home = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert compile_cache.cache_dir("auto", home) == tmp_path / "xdg" / "coerase-jax" / "xla"
    assert compile_cache.cache_dir(str(tmp_path / "mine"), home) == tmp_path / "mine"
    assert compile_cache.cache_dir(str(tmp_path / "mine"), {**home, "COERASE_COMPILE_CACHE": "/shared/x"}) == \
        Path("/shared/x")
    assert compile_cache.cache_dir("auto", {"COERASE_COMPILE_CACHE": "off"}) is None
    assert compile_cache.cache_dir("off", home) is None


def _erase(run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_COMPILATION", "JAX_PERSISTENT"))}
    env["COERASE_COMPILE_CACHE"] = str(cache)
    command = [sys.executable, "-m", "coerase_jax.cli", "erase", "--config", "configs/tiny.py", "--run-dir", str(run_dir),
               "--config.erase.stages=('text',)", "--config.text_stage.steps=4", "--config.checkpoint.every=2",
               "--config.erase.ddim_steps=4"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # (45 s: two erasures in fresh processes)
def test_a_resumed_erasure_compiles_nothing_with_a_warm_cache(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "xla"
    first = _erase(run_dir, cache)
    assert first.returncode == 0, first.stderr[-2000:]
    compiled = int(first.stdout.split("coerase: ")[-1].split(" programs compiled")[0])
    assert compiled > 0 and any(cache.iterdir())
    # cut the run back to its step-2 checkpoint, as if it had been killed there
    stage = run_dir / "stage_text"
    (stage / "done.json").unlink()
    shutil.rmtree(stage / "checkpoints" / "4")
    resumed = _erase(run_dir, cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[text] resuming from step 2" in resumed.stdout
    assert "coerase: 0 programs compiled" in resumed.stdout, resumed.stdout[-1500:]


def _device_check(out: Path, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on one accelerator
    command = [sys.executable, "benchmarks/device_check.py", "--shapes", "tiny", "--steps", "2", "--ddim-steps", "4",
               "--out", str(out), *extra]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((out / "device_check.json").read_text())["rows"]


@pytest.mark.slow  # (85 s; a benchmark's rehearsal, kept out of the default run for its time budget)
def test_the_accelerator_check_rehearses_on_a_cpu_and_writes_its_table(tmp_path):
    """Two of its rows (the full rehearsal is the slow test below): one concept (with the sampler)
    and eight side by side, and the table."""
    rows = _device_check(tmp_path, "--only", "one,side")
    assert [row["name"] for row in rows] == ["esd-x, 1 concept", "esd-x, 8 concepts side by side"]
    one, side = rows[0]["result"], rows[1]["result"]
    assert side["concepts"] == 8 and side["flops_per_iter"] > 6 * one["flops_per_iter"]
    assert one["images_per_s"] > 0 and side["step_s_median"] > 0
    table = (tmp_path / "device_check.md").read_text()
    assert "| esd-x, 8 concepts side by side | 1 |" in table and "the concepts per hour" in table


@pytest.mark.slow  # (145 s: every row on the tiny shapes)
def test_the_whole_accelerator_check_runs_on_a_cpu(tmp_path):
    rows = _device_check(tmp_path)
    rows = json.loads((tmp_path / "device_check.json").read_text())["rows"]
    names = [row["name"] for row in rows]
    assert names == ["batch 1, attention xla", "batch 1, attention chunked", "batch 1, zt_sampler=teacher",
                     "largest batch", "esd-x, 1 concept", "esd-x, 8 concepts side by side"]
    timed = {row["name"]: row["result"] for row in rows if "result" in row}
    assert set(timed) == set(names) - {"largest batch"}  # a CPU reports no memory limit
    assert all(r["step_s_median"] > 0 and r["flops_per_iter"] > 0 for r in timed.values())
    side = timed["esd-x, 8 concepts side by side"]
    assert side["concepts"] == 8 and side["flops_per_iter"] > 6 * timed["esd-x, 1 concept"]["flops_per_iter"]
    assert timed["batch 1, attention xla"]["images_per_s"] > 0
    table = (tmp_path / "device_check.md").read_text()
    assert "| batch 1, attention chunked | 1 |" in table and "concepts per hour" in table
