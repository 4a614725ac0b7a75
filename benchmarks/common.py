"""Set-up shared by the benchmark scripts: simulated devices off-GPU, and the model to time."""

from __future__ import annotations

import os


def has_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")


def simulate_devices_unless_gpu(count: int) -> None:
    """On a machine without a GPU, simulate `count` CPU devices (before jax starts)."""
    if "cpu" in os.environ.get("JAX_PLATFORMS", "") or not has_gpu():
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"


def model_to_time(preset: str, layers: int = 0, max_seq_len: int = 0):
    """(config, host params): a preset with optional overrides. Tiny presets get their real
    random init; real shapes get tiled random weights (fast, for timing only)."""
    from models.params import init_params, synthetic_params
    from models.presets import get_preset

    changes = {}
    if layers:
        changes["num_layers"] = layers
        # DeepSeek-V3 has 3 dense layers first: with fewer layers, keep at least one MoE layer.
        dense = get_preset(preset).first_dense_layers
        if dense >= layers:
            changes["first_dense_layers"] = layers - 1
    if max_seq_len:
        changes["max_seq_len"] = max_seq_len
    cfg = get_preset(preset).replace(**changes)
    params = init_params(cfg) if cfg.d_model < 512 else synthetic_params(cfg)
    return cfg, params


def full_batch_decode_inputs(engine, position: int, token: int | None = None) -> tuple:
    """(tokens, positions, sampling) of a decode with every request slot busy at `position`,
    greedy: the inputs of `mesh.decode` for timing it alone. Each slot's input is its
    request's last token (a slot without one: a token of its own), as in the engine's steps,
    or `token` in every slot. One token everywhere routes every row alike: on one H100 such
    steps ran faster than a floor that assumed spread routing (RESULTS.md, 2026-12-07)."""
    import numpy as np

    b = engine.mesh.geometry.num_request_slots
    if token is not None:
        tokens = np.full((b,), token, np.int32)
    else:
        tokens = (np.arange(b, dtype=np.int64) * 7919 + 1) % engine.cfg.vocab_size
        for s, owner in enumerate(engine.slot_owner[:b]):
            request = engine.journal.get(owner) if owner is not None else None
            if request is not None and request.generated:
                tokens[s] = request.generated[-1]
        tokens = tokens.astype(np.int32)
    positions = np.full((b,), position, np.int32)
    return tokens, positions, engine._sampling([None] * b)


def median_ms(call, repeats: int, warm: bool = True) -> float:
    """Median wall milliseconds of `call()` over `repeats` calls, each waited for (its result
    blocked on); one untimed call first when `warm`."""
    import time

    import jax
    import numpy as np

    if warm:
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def decode_step_timer(engine, position: int, steps: int, token: int | None = None):
    """Warms the full-batch decode (full_batch_decode_inputs) once and returns a timer: the
    median ms of `steps` decode steps, each waited for."""
    import jax

    mesh, inputs = engine.mesh, full_batch_decode_inputs(engine, position, token)

    def step():
        return mesh.decode(*inputs).tokens

    jax.block_until_ready(step())  # the warm-up call
    return lambda: median_ms(step, steps, warm=False)


def back_to_back_ms(engine, position: int, steps: int, token: int | None = None) -> float:
    """Milliseconds per decode step when `steps` full-batch steps are launched one after the
    other and waited for once: the device's rate when the host keeps ahead of it (a step
    waited for alone also counts its launch)."""
    return back_to_back(engine, position, steps, token)[1]


def back_to_back(
    engine, position: int, steps: int, token: int | None = None
) -> tuple[float, float]:
    """(ms per step to launch, ms per step to finish) of `steps` full-batch decode steps
    launched one after the other and waited for once, after one warm step."""
    import time

    import jax

    mesh, inputs = engine.mesh, full_batch_decode_inputs(engine, position, token)
    jax.block_until_ready(mesh.decode(*inputs).tokens)
    start = time.perf_counter()
    for _ in range(steps):
        out = mesh.decode(*inputs)
    launched = time.perf_counter() - start
    jax.block_until_ready(out.tokens)
    done = time.perf_counter() - start
    return 1000 * launched / steps, 1000 * done / steps


def copy_gbs(device, megabytes: int = 1024) -> float:
    """HBM copy bandwidth of `device` in GB/s (bytes read + written): the roofline's divisor,
    measured on the card that is timed (median of 20 copies of a `megabytes` array). A sum's
    read rate was lower still on an H100 (2.1 against 2.6 TB/s), so no better read floor was
    found; decode steps that read all they touch can beat this floor (RESULTS.md)."""
    import jax
    import jax.numpy as jnp

    n = megabytes * 2**20 // 4
    x = jax.device_put(jnp.zeros((n,), jnp.float32), device)
    copy = jax.jit(lambda a: a + 1)
    ms = median_ms(lambda: copy(x), 20)
    return 2 * n * 4 / (ms / 1000) / 1e9
