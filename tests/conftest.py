"""Test set-up: 8 simulated CPU devices, and jaxtyping shape checks at run time.

Both must happen before jax or the project's modules are imported.
"""

import os

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
def devices():
    found = jax.devices()
    assert len(found) >= 8, "tests need 8 simulated devices (XLA_FLAGS was set too late)"
    return found[:8]
