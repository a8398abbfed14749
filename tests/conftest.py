"""Test set-up: 8 simulated CPU devices (set before jax loads), a private preset cache, and one
compilation cache for the session (shared with the commands tests start), so a program that
several tests compile alike is compiled once; the cache of whole executables is off unless a test
turns it on."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("COERASE_CACHE", tempfile.mkdtemp(prefix="coerase-test-cache-"))
os.environ.setdefault("COERASE_COMPILE_CACHE", tempfile.mkdtemp(prefix="coerase-test-xla-"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["COERASE_COMPILE_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Whole executables are keyed by the source files and the config, not by what a test may patch in
# between; tests that check them turn them on for themselves (compile_cache.enable_executables).
os.environ.setdefault("COERASE_EXECUTABLE_CACHE", "off")

import logging  # noqa: E402

import pytest  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_bundle():
    from coerase_jax.models.bundle import load_bundle

    return load_bundle("tiny")


@pytest.fixture(scope="session")
def tiny_folder():
    from coerase_jax.models import presets

    return presets.materialise("tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_bundle():
    from coerase_jax.models.bundle import load_bundle

    return load_bundle("tiny-sdxl")
