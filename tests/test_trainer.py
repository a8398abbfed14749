"""The erasure run: resume after SIGKILL / SIGTERM, clear errors, non-finite loss, effect on the tiny model."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from coerase_jax import compile_cache
from coerase_jax.configuration import config_from_run, load_config
from coerase_jax.data import embeddings
from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase.method import negative_guidance_target
from coerase_jax.erase.step import denoiser
from coerase_jax.erase.trainer import DAMAGED, final_params, run_erasure
from coerase_jax.errors import UserError
from coerase_jax.parallel.mesh import make_mesh
from tolerance import assert_same_maths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _overrides(run_dir, image_dir, steps=15):
    return [f"--config.run_dir={run_dir}", f"--config.data.image_dir={image_dir}",
            f"--config.text_stage.steps={steps}", f"--config.image_stage.steps={steps}",
            "--config.checkpoint.every=5"]


def _one_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


def _cli(run_dir, image_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device in the child
    cmd = [sys.executable, "-m", "coerase_jax.cli", "erase", "--config", str(REPO / "configs" / "tiny.py"),
           *_overrides(run_dir, image_dir)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _wait_for_lines(path: Path, count: int, process, timeout=300, checkpoint: int = 5):
    """Until the stage logged ``count`` steps and its checkpoint ``checkpoint`` is finalised."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        finalised = (path.parent / "checkpoints" / str(checkpoint)).is_dir()
        if finalised and path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run")


def _final(run_dir, bundle):
    return final_params(config_from_run(str(run_dir)), bundle)


def _assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tiny_bundle, image_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(run_dir, image_dir))
    params = run_erasure(config, tiny_bundle, progress=False, mesh=_one_device())
    return run_dir, params


# (80 s; the default run keeps resume = uninterrupted through the damaged-checkpoint test below)
@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_to_the_same_parameters(uninterrupted, tiny_bundle, image_dir,
                                                                    tmp_path):
    _, expected = uninterrupted
    run_dir = tmp_path / "killed"
    process = _cli(run_dir, image_dir)
    _wait_for_lines(run_dir / "stage_image" / "metrics.jsonl", 7, process)  # checkpoint at 5, not yet 10
    process.kill()
    process.wait()
    resumed = _cli(run_dir, image_dir)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "[text] already finished" in out and "[image] resuming from step" in out
    _assert_same_params(_final(run_dir, tiny_bundle), expected)
    steps = [json.loads(line)["step"] for line in (run_dir / "stage_image" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 16))  # replayed steps are not logged twice


@pytest.mark.slow  # (67 s)
def test_sigterm_saves_and_resumes_to_the_same_parameters(uninterrupted, tiny_bundle, image_dir, tmp_path):
    _, expected = uninterrupted
    run_dir = tmp_path / "preempted"
    process = _cli(run_dir, image_dir)
    _wait_for_lines(run_dir / "stage_text" / "metrics.jsonl", 7, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "SIGTERM: saved a checkpoint at step" in err
    saved = sorted(int(p.name) for p in (run_dir / "stage_text" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] >= 7  # the pre-emption save, not only the periodic one at 5
    resumed = _cli(run_dir, image_dir)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    _assert_same_params(_final(run_dir, tiny_bundle), expected)


def test_an_existing_run_dir_with_another_config_is_refused(uninterrupted, tiny_bundle, image_dir):
    run_dir, _ = uninterrupted
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(run_dir, image_dir) +
                         ["--config.erase.eta=2.0"])
    with pytest.raises(UserError, match="different config"):
        run_erasure(config, tiny_bundle, progress=False, mesh=_one_device())


@pytest.mark.parametrize("problem", ["missing", "empty", "corrupt"])
def test_bad_image_folders_are_clear_errors(problem, tiny_bundle, image_dir, tmp_path):
    folder = tmp_path / "images"
    if problem != "missing":
        folder.mkdir()
    if problem == "corrupt":
        Image.open(sorted(image_dir.glob("*.png"))[0]).save(folder / "good.png")
        (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run_dir = tmp_path / "run"
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(run_dir, folder))
    with pytest.raises(UserError) as err:
        run_erasure(config, tiny_bundle, progress=False, mesh=_one_device())
    expected = {"missing": "does not exist", "empty": "holds no images", "corrupt": "bad.png"}[problem]
    assert expected in str(err.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # nothing half-written


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_bundle, image_dir, tmp_path):
    run_dir = tmp_path / "diverging"
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(run_dir, image_dir, steps=30) + [
        "--config.erase.stages=text", "--config.optim.name=sgd", "--config.text_stage.learning_rate=1e30",
        "--config.checkpoint.every=1"])
    with pytest.raises(UserError, match="non-finite loss") as err:
        run_erasure(config, tiny_bundle, progress=False, mesh=_one_device())
    checkpoints = run_dir / "stage_text" / "checkpoints"
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and f"(step {saved[-1]})" in str(err.value)
    failed_step = int(str(err.value).split(" at step ")[1].split()[0])
    assert saved[-1] == failed_step - 1  # the state that produced the bad loss was never saved
    assert not (run_dir / "stage_text" / "done.json").exists()


def test_reference_embeddings_are_encoded_once(tiny_bundle, image_dir, monkeypatch):
    first = embeddings.folder_embeddings(tiny_bundle, image_dir)
    assert (image_dir / embeddings.CACHE_NAME).is_file()

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded despite a valid cache")

    monkeypatch.setattr(embeddings, "encode_images", fail)
    np.testing.assert_array_equal(embeddings.folder_embeddings(tiny_bundle, image_dir), first)
    assert first.shape == (4, 32)


def test_erasure_moves_the_concept_toward_the_target_more_than_an_unrelated_prompt(tiny_bundle, image_dir,
                                                                                     tmp_path):
    """On the random tiny model (numbers in the issue note): text-stage ESD on cross-attention."""
    b = tiny_bundle
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(tmp_path / "run", image_dir, steps=40) + [
        "--config.erase.stages=text", "--config.text_stage.subset=esd-x", "--config.text_stage.learning_rate=1e-3",
        "--config.checkpoint.every=1000"])
    params = run_erasure(config, b, progress=False, mesh=_one_device())
    eps = jax.jit(denoiser(b.unet))
    encode = lambda prompt: b.encode_text(b.text_params, b.tokenize([prompt] * 10))
    concept, unrelated, empty = encode("a red circle"), encode("a blue square"), encode("")
    plan = NoiseSchedule.from_config(b.scheduler_config).ddim_plan(10)
    z = jax.random.normal(jax.random.PRNGKey(123), (10, 4, 8, 8))
    t = plan.timesteps
    original = b.unet_params
    target = negative_guidance_target(eps(original, z, t, empty), eps(original, z, t, concept), 1.0)
    mse = lambda a: float(jnp.mean(a ** 2))
    before, after = mse(eps(original, z, t, concept) - target), mse(eps(params, z, t, concept) - target)
    concept_move = mse(eps(params, z, t, concept) - eps(original, z, t, concept))
    unrelated_move = mse(eps(params, z, t, unrelated) - eps(original, z, t, unrelated))
    print(f"distance to target {before:.4f} -> {after:.4f}; concept moved {concept_move:.4f}, "
          f"unrelated moved {unrelated_move:.4f}")
    assert after < 0.5 * before  # the loss on a fixed evaluation set falls
    assert unrelated_move < 0.8 * concept_move


@pytest.mark.cross_program
def test_contrastive_pairs_give_the_mean_difference_embedding(tiny_bundle, tmp_path):
    rng = np.random.default_rng(3)
    pos, neg = [], []
    for i in range(2):
        pair = tmp_path / f"pair{i}"
        pair.mkdir()
        for name, sink in (("positive.png", pos), ("negative.png", neg)):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(pair / name)
            sink.append(image)
    got = embeddings.contrastive_embeddings(tiny_bundle, tmp_path, "diff", average=True)
    positive = embeddings.encode_images(tiny_bundle, pos)
    expected = (positive - embeddings.encode_images(tiny_bundle, neg)).mean(0)
    # the pairs may be encoded in other batches (other programs): per layer of the 2-layer, 32-wide vision
    # tower two LayerNorms, q/k/v/out and the MLP (32 + 64 wide), attention over 17 positions; then the
    # projection, the difference and the mean. The embeddings' size is the scale, not their difference's.
    layer = 2 * 32 + 4 * 32 + 32 + 64 + 8 + 2 * 17
    assert_same_maths(got[0], expected, 2 * layer + 32 + 4, scale=float(np.abs(positive).max()))
    (tmp_path / "pair1" / "negative.png").unlink()
    with pytest.raises(UserError, match="has no negative.png"):
        embeddings.contrastive_embeddings(tiny_bundle, tmp_path, "l2", average=False)


def test_no_recompilation_during_a_run(tiny_bundle, image_dir, tmp_path):
    """The step (z_t loop included) compiles once: no backend compile after the first step."""
    from jax._src import monitoring
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    compiles = []

    def count(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(count)
    seen = {}
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(tmp_path / "run", image_dir, steps=8) + [
        "--config.checkpoint.every=3"])
    try:
        run_erasure(config, tiny_bundle, progress=False, mesh=_one_device(),
                    on_step=lambda stage, step, metrics: seen.setdefault(stage, []).append(
                        (step, len(compiles), metrics["ddim_index"])))
    finally:
        monitoring.unregister_event_duration_listener(count)
    for stage, records in seen.items():
        assert [r[0] for r in records] == list(range(1, 9))
        assert len({r[2] for r in records}) > 2, "the DDIM index should vary between steps"
        assert records[-1][1] == records[0][1], f"{stage}: compiled again after its first step"


def test_a_run_made_before_newer_config_keys_still_loads_with_their_defaults(uninterrupted, tiny_bundle, image_dir):
    """An older run's config.json lacks keys added since (LoRA, joint erasure, eval, the anchor): they
    take the defaults, which are the behaviour of that time, so its result still loads and the run
    still resumes under today's config."""
    from coerase_jax.erase.trainer import check_run_dir

    run_dir, expected = uninterrupted
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["erase"]["lora_rank"], saved["erase"]["lora_alpha"], saved["concept"]["joint"], saved["eval"]
    del saved["erase"]["anchor_prompt"]
    old = run_dir.parent / "older_run"
    shutil.copytree(run_dir, old)
    (old / "config.json").write_text(json.dumps({**saved, "run_dir": str(old)}))
    config = config_from_run(str(old))
    assert config.erase.lora_rank == 0 and config.concept.joint == () and config.eval.judge == "auto"
    assert config.concept.prompts == tuple(saved["concept"]["prompts"])
    _assert_same_params(final_params(config, tiny_bundle), expected)
    check_run_dir(old, load_config(str(REPO / "configs" / "tiny.py"), _overrides(old, image_dir)))  # resumes
    with pytest.raises(UserError, match="different config"):  # but a changed default it never had is refused
        check_run_dir(old, load_config(str(REPO / "configs" / "tiny.py"), _overrides(old, image_dir) +
                                       ["--config.erase.anchor_prompt=a square"]))


def _copy_run(run_dir: Path, to: Path) -> None:
    """A copy of a run directory that resumes where it lies (its config names its own folder)."""
    shutil.copytree(run_dir, to)
    saved = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**saved, "run_dir": str(to)}, indent=2, sort_keys=True))


def _damage(checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    for file in (checkpoint / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(rng.integers(0, 256, max(file.stat().st_size, 64), dtype=np.uint8).tobytes())


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(uninterrupted, tiny_bundle, image_dir, tmp_path,
                                                                capsys):
    """Twice, with whole executables on: the first resumption compiles its step and keeps it, the
    second loads that executable; both end with the uninterrupted run's weights."""
    run_dir, expected = uninterrupted
    for attempt, how in enumerate(("compiled", "loaded")):
        copy = tmp_path / f"damaged{attempt}"
        _copy_run(run_dir, copy)
        checkpoints = copy / "stage_image" / "checkpoints"
        assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [5, 10, 15]
        _damage(checkpoints / "15")
        (copy / "stage_image" / "done.json").unlink()
        config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(copy, image_dir))
        with compile_cache.executables_in(tmp_path / "executables"):
            params = run_erasure(config, tiny_bundle, progress=False, mesh=_one_device())
        out = capsys.readouterr().out
        assert "checkpoint 15 in" in out and "does not read" in out and "[image] resuming from step 10" in out
        assert f"[image] {how} the step" in out
        assert (copy / "stage_image" / "damaged_checkpoints" / "15" / "state").is_dir()  # set aside, not deleted
        _assert_same_params(params, expected)
        _assert_same_params(_final(copy, tiny_bundle), expected)  # and the new step-15 checkpoint reads


def test_no_readable_checkpoint_is_a_one_line_error_that_moves_nothing(uninterrupted, tiny_bundle, image_dir,
                                                                      tmp_path):
    run_dir, _ = uninterrupted
    copy = tmp_path / "all_damaged"
    _copy_run(run_dir, copy)
    checkpoints = copy / "stage_image" / "checkpoints"
    for step in (5, 10, 15):
        _damage(checkpoints / str(step))
    (copy / "stage_image" / "done.json").unlink()
    config = load_config(str(REPO / "configs" / "tiny.py"), _overrides(copy, image_dir))
    with pytest.raises(UserError, match="no checkpoint in .* reads .*step 15: .*step 10: .*step 5: ") as err:
        run_erasure(config, tiny_bundle, progress=False, mesh=_one_device())
    assert "\n" not in str(err.value)
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [5, 10, 15]
    assert not (copy / "stage_image" / DAMAGED).exists()
