"""Test set-up: 8 simulated CPU devices, and jaxtyping shape checks at run time.

Both must happen before jax or the project's modules are imported.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxtyping import install_import_hook  # noqa: E402

# Every annotated array argument and result in these packages is checked (dtype and shape).
install_import_hook(["models", "mesh", "elastic_moe"], "beartype.beartype")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def loaded():
    """loaded(arch) -> (cfg, params) of tests/fixtures/hf/<arch>, each loaded once per run."""
    from models.hf_loader import load_hf

    fixtures = Path(__file__).parent / "fixtures" / "hf"
    cache = {}

    def load(arch: str):
        if arch not in cache:
            cache[arch] = load_hf(fixtures / arch, progress=False)
        return cache[arch]

    return load


@pytest.fixture(scope="session")
def devices():
    found = jax.devices()
    assert len(found) >= 8, "tests need 8 simulated devices (XLA_FLAGS was set too late)"
    return found[:8]
