"""Checksums of expert weights, the same bits on the host and on the device.

A slot's checksum is sum_i bits[i] * (2 i + 1) mod 2^32 over the flattened weight, where bits
are the element's raw bits as an unsigned integer. Integer sums wrap and are associative, so
the order XLA reduces in does not matter and the host (numpy) and the device (XLA) agree bit for
bit. The odd weights make the sum depend on where each value sits, so a slot holding another
expert, a transposed or shifted copy, or a flipped bit all show.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int, UInt32

from mesh.device_mesh import EXPERT_AXIS

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _unsigned(dtype) -> np.dtype:
    size = np.dtype(dtype).itemsize
    if size not in _UNSIGNED:
        raise TypeError(f"no checksum for {np.dtype(dtype)} ({size}-byte elements)")
    return np.dtype(_UNSIGNED[size])


def host_checksums(weights: np.ndarray, chunk_bytes: int = 1 << 26) -> UInt32[np.ndarray, " n"]:
    """[n] checksum of each weights[k] (numpy; `chunk_bytes` bounds the temporaries)."""
    weights = np.ascontiguousarray(weights)
    n = weights.shape[0]
    flat = weights.reshape(n, -1).view(_unsigned(weights.dtype))
    size = flat.shape[1]
    odd = np.arange(size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    out = np.empty((n,), np.uint32)
    per_chunk = max(1, chunk_bytes // max(1, 4 * size))
    for start in range(0, n, per_chunk):
        bits = flat[start : start + per_chunk].astype(np.uint32)
        out[start : start + per_chunk] = (bits * odd).sum(axis=1, dtype=np.uint32)
    return out


def device_checksum(weight: Array) -> UInt32[Array, ""]:
    """The checksum of one slot's weight (inside a jitted program)."""
    bits = jax.lax.bitcast_convert_type(weight, jnp.dtype(_unsigned(weight.dtype)))
    bits = bits.reshape(-1).astype(jnp.uint32)
    odd = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * odd, dtype=jnp.uint32)


class SlotChecksums:
    """Checksums of chosen expert slots, computed on the devices that hold them.

    One call takes, per device, a list of its local slots ([devices, S], -1 = none) and returns
    [num_weights, devices, S] uint32; a loop over the listed slots only reads those slots, so
    checking the few slots a reconfiguration wrote is cheap. One program per mesh serves every
    list (the list is data).
    """

    def __init__(self, mesh: Mesh, weight_shapes: Sequence[jax.ShapeDtypeStruct]):
        self.mesh = mesh
        spec = P(EXPERT_AXIS)
        sharded = NamedSharding(mesh, spec)
        self._weights = tuple(
            jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharded) for w in weight_shapes
        )
        self.slots_per_device = weight_shapes[0].shape[0] // mesh.devices.size
        self._executable = None
        self._lock = threading.Lock()

        def checksum_local(weights, slots):
            slots = slots[0]  # this device's row: [S]
            count = jnp.sum(slots >= 0)
            out = jnp.zeros((len(weights), slots.shape[0]), jnp.uint32)
            out = jax.lax.pcast(out, (EXPERT_AXIS,), to="varying")  # per-device values

            def one(k, out):
                slot = jnp.clip(slots[k], 0, weights[0].shape[0] - 1)
                sums = [device_checksum(jax.lax.dynamic_index_in_dim(w, slot, 0)) for w in weights]
                return out.at[:, k].set(jnp.stack(sums))

            # Listed slots come first (the caller packs them), so `count` iterations read them.
            return jax.lax.fori_loop(0, count, one, out)[:, None, :]

        body = jax.shard_map(
            checksum_local,
            mesh=mesh,
            in_specs=(spec, spec),
            out_specs=P(None, EXPERT_AXIS),
        )
        self._checksum = jax.jit(body)

    def compile(self):
        with self._lock:
            if self._executable is None:
                n = self.mesh.devices.size
                slots = jax.ShapeDtypeStruct(
                    (n, self.slots_per_device),
                    np.int32,
                    sharding=NamedSharding(self.mesh, P(EXPERT_AXIS)),
                )
                self._executable = self._checksum.lower(self._weights, slots).compile()
            return self._executable

    def __call__(
        self,
        weights: tuple[jax.Array, ...],
        local_slots: Int[np.ndarray, "devices slots_per_device"],
    ) -> UInt32[np.ndarray, "weights devices slots_per_device"]:
        """local_slots[d]: the local slots of device d to check, packed first, then -1."""
        sharding = NamedSharding(self.mesh, P(EXPERT_AXIS))
        table = jax.device_put(local_slots.astype(np.int32), sharding)
        return np.asarray(self.compile()(tuple(weights), table))
