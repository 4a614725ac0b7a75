"""Test set-up: 8 simulated CPU devices, and jaxtyping shape checks at run time.

Both must happen before jax or the project's modules are imported.
"""

import atexit
import os
import shutil
import tempfile
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

# One persistent compilation cache per test run: the many engines built with the same model,
# mesh and geometry compile each program once (tracing still runs each time). Fresh per run,
# so no test depends on what an earlier run left; CLI and worker subprocesses share it.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="elastic-moe-test-xla-cache-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
os.environ.setdefault("ELASTIC_MOE_CACHE_DIR", _COMPILE_CACHE)
jax.config.update("jax_compilation_cache_dir", os.environ["ELASTIC_MOE_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
