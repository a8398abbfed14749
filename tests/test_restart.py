"""Restarting fast and safely: the compilation cache, and the one-shot accelerator check (CPU rehearsal)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
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
    env["COERASE_EXECUTABLE_CACHE"] = "on"
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
    assert "[text] loaded the step" in resumed.stdout  # the whole executable: no tracing either
    assert "coerase: 0 programs compiled" in resumed.stdout, resumed.stdout[-1500:]


@pytest.fixture
def executables(tmp_path):
    folder = tmp_path / "executables"
    with compile_cache.executables_in(folder):
        yield folder


def _program():
    def step(state, batch):
        return {"w": state["w"] - 0.1 * batch.mean(0), "n": state["n"] + 1}, (batch ** 2).sum()

    return jax.jit(step, donate_argnums=0)


def _state():
    return {"w": jnp.arange(4.0), "n": jnp.zeros((), jnp.int32)}


def test_an_executable_is_saved_once_and_loaded_whole_with_the_same_results(executables):
    batch = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    expected = _program()(_state(), batch)  # now in XLA's cache, whose copy could not be saved again
    first, how = compile_cache.compile_program(_program(), (_state(), batch), {"lr": 0.1}, "toy")
    assert how == "compiled" and len(list(executables.glob("toy-*.bin"))) == 1
    loaded_before = compile_cache.counter().counts()[1]
    again, how = compile_cache.compile_program(_program(), (_state(), batch), {"lr": 0.1}, "toy")
    assert how == "loaded" and compile_cache.counter().counts()[1] == loaded_before + 1
    for out in (first(_state(), batch), again(_state(), batch)):  # the same binary: equal to the bit
        jax.tree_util.tree_map(np.testing.assert_array_equal, out, expected)
    xla_cache = Path(os.environ["COERASE_COMPILE_CACHE"])  # and XLA's cache is in use again after
    entries = set(xla_cache.iterdir())
    jax.jit(lambda x: x * 7.25 - 3).lower(batch).compile()
    assert set(xla_cache.iterdir()) - entries


def test_an_executable_is_new_for_other_static_values_shapes_or_shardings(executables):
    batch = jnp.ones((3, 4))
    compile_cache.compile_program(_program(), (_state(), batch), {"lr": 0.1}, "toy")
    assert compile_cache.compile_program(_program(), (_state(), batch), {"lr": 0.2}, "toy")[1] == "compiled"
    assert compile_cache.compile_program(_program(), (_state(), jnp.ones((5, 4))), {"lr": 0.1}, "toy")[1] == \
        "compiled"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    split = jax.device_put(batch[:2], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    keys = {compile_cache.program_key("toy", {}, (_state(), b)) for b in (batch[:2], split)}
    assert len(keys) == 2
    assert len(list(executables.glob("toy-*.bin"))) == 3
    # a program over two of the eight devices loads onto those two, in their order
    on_two = jax.jit(lambda x: x * 2 + 1, out_shardings=split.sharding)
    compile_cache.compile_program(on_two, (split,), {}, "two")
    loaded, how = compile_cache.compile_program(on_two, (split,), {}, "two")
    out = loaded(split)
    assert how == "loaded" and out.sharding == split.sharding
    np.testing.assert_array_equal(out, np.asarray(split) * 2 + 1)


def test_a_damaged_executable_is_compiled_again_and_replaced(executables, capsys):
    batch = jnp.ones((3, 4))
    compile_cache.compile_program(_program(), (_state(), batch), {}, "toy")
    (path,) = executables.glob("toy-*.bin")
    path.write_bytes(b"not an executable")
    compiled, how = compile_cache.compile_program(_program(), (_state(), batch), {}, "toy")
    assert how == "compiled" and "could not load" in capsys.readouterr().out
    assert compile_cache.compile_program(_program(), (_state(), batch), {}, "toy")[1] == "loaded"


def test_values_without_a_stable_description_are_not_cached(executables, capsys):
    class Opaque:
        pass

    compiled, how = compile_cache.compile_program(_program(), (_state(), jnp.ones((3, 4))), Opaque(), "toy")
    assert how == "compiled" and "not caching" in capsys.readouterr().out
    assert not executables.exists() or not list(executables.iterdir())


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
