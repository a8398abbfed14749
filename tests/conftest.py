"""Test set-up: 8 simulated CPU devices (set before jax loads) and a private preset cache."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("COERASE_CACHE", tempfile.mkdtemp(prefix="coerase-test-cache-"))

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
