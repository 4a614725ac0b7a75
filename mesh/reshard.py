"""Moving arrays from one mesh to the next: survivors' shards reused in place, experts moved
between slots by jit-compiled collectives, lost experts written back from the host copy.

All arrays here split their leading axis over the one mesh axis (`EXPERT_AXIS`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from mesh.device_mesh import EXPERT_AXIS


def _mesh_devices(array: jax.Array) -> list[jax.Device]:
    return list(array.sharding.mesh.devices.flat)


@functools.cache
def _device_filler(shape: tuple[int, ...], dtype, value: float, device: jax.Device):
    """A compiled program that fills a buffer on the device itself (no host-to-device copy)."""
    return jax.jit(
        lambda: jnp.full(shape, value, dtype), out_shardings=SingleDeviceSharding(device)
    )


def _device_zeros(shape: tuple[int, ...], dtype, device: jax.Device) -> jax.Array:
    return _device_filler(tuple(shape), jnp.dtype(dtype), 0.0, device)()


def reassemble(
    array: jax.Array,
    keep: Sequence[int | None],
    new_sharding: NamedSharding,
    fill: Callable[[int], np.ndarray] | None = None,
) -> jax.Array:
    """The same array on a new mesh: new device j takes old device keep[j]'s buffer as it is
    (no copy). A new device (keep[j] is None) gets fill(j), or zeros.

    Works for arrays split over the mesh axis and for replicated ones alike.
    """
    old_devices = _mesh_devices(array)
    shards = {s.device: s.data for s in array.addressable_shards}
    new_devices = list(new_sharding.mesh.devices.flat)
    split = new_sharding.spec and new_sharding.spec[0] == EXPERT_AXIS
    shard_shape = next(iter(shards.values())).shape
    buffers = []
    for j, device in enumerate(new_devices):
        if keep[j] is None:
            if fill is not None:
                buffers.append(jax.device_put(fill(j), device))
            else:
                buffers.append(_device_zeros(shard_shape, array.dtype, device))
        else:
            old = old_devices[keep[j]]
            if old != device:
                raise ValueError(f"new mesh position {j} is {device}, but keep[{j}] names {old}")
            buffers.append(shards[old])
    rows = shard_shape[0] * len(new_devices) if split else shard_shape[0]
    return jax.make_array_from_single_device_arrays((rows, *shard_shape[1:]), new_sharding, buffers)


def poison(array: jax.Array, lost_positions: Sequence[int]) -> jax.Array:
    """The array with the shards of the lost devices replaced by NaN (and their buffers freed).

    On a simulated device nothing is really lost; poisoning makes any later read of a lost
    device's memory show up as a changed output instead of silently working.
    """
    if not lost_positions:
        return array
    devices = _mesh_devices(array)
    lost = {devices[p] for p in lost_positions}
    by_device = {}
    for shard in array.addressable_shards:  # read once: deleting a buffer retires `array`
        if shard.device in lost:
            shape, dtype = tuple(shard.data.shape), jnp.dtype(shard.data.dtype)
            shard.data.delete()
            fill = np.nan if jnp.issubdtype(dtype, jnp.floating) else -1
            by_device[shard.device] = _device_filler(shape, dtype, fill, shard.device)()
        else:
            by_device[shard.device] = shard.data
    ordered = [by_device[d] for d in devices]
    return jax.make_array_from_single_device_arrays(array.shape, array.sharding, ordered)


class SlotTransfer:
    """Copies expert slots between devices of one mesh; the plan is data, so one compiled
    program per mesh serves every plan.

    One call runs one round: for each shift s (0 = within a device) device d reads its local
    slot send[d, s] and device (d + s) % N writes it into its local slot recv[(d + s) % N, s].
    The shifts run in order, s = 0 first: within a shift every read comes before the write,
    and a later shift reads what an earlier one wrote. `mesh.transfer_plan` schedules by
    exactly this order, so the extra memory is a slot or two per device. Shifts nobody uses in
    the round are skipped at run time (a replicated predicate per shift).
    """

    def __init__(self, mesh: Mesh, weight_shapes: Sequence[jax.ShapeDtypeStruct]):
        """weight_shapes: global shape and dtype of each expert array moved together."""
        self.mesh = mesh
        n = mesh.devices.size
        spec = P(EXPERT_AXIS)
        self._weights = tuple(
            jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh, spec))
            for w in weight_shapes
        )
        self._executable = None
        self._lock = threading.Lock()

        def round_local(weights, send, recv, used):
            send, recv = send[0], recv[0]  # this device's row: [n]
            s_local = weights[0].shape[0]
            for shift in range(n):

                def move(ws, shift=shift):
                    src = jnp.clip(send[shift], 0, s_local - 1)
                    dst = recv[shift]
                    out = []
                    for w in ws:
                        buf = w[src]
                        if shift:
                            perm = [(i, (i + shift) % n) for i in range(n)]
                            buf = jax.lax.ppermute(buf, EXPERT_AXIS, perm)
                        safe = jnp.clip(dst, 0, s_local - 1)
                        written = jax.lax.dynamic_update_index_in_dim(w, buf, safe, 0)
                        out.append(jnp.where(dst >= 0, written, w))
                    return tuple(out)

                weights = jax.lax.cond(used[shift], move, lambda ws: ws, weights)
            return weights

        body = jax.shard_map(
            round_local,
            mesh=mesh,
            in_specs=(spec, spec, spec, P()),
            out_specs=spec,
        )
        self._round = jax.jit(body, donate_argnums=(0,))

    def compile(self):
        """The ahead-of-time compiled round (built once per mesh)."""
        with self._lock:
            return self._compile()

    def _compile(self):
        if self._executable is None:
            n = self.mesh.devices.size
            table = jax.ShapeDtypeStruct(
                (n, n), np.int32, sharding=NamedSharding(self.mesh, P(EXPERT_AXIS))
            )
            used = jax.ShapeDtypeStruct((n,), np.bool_, sharding=NamedSharding(self.mesh, P()))
            self._executable = self._round.lower(self._weights, table, table, used).compile()
        return self._executable

    def __call__(
        self,
        weights: tuple[Float[Array, "slots ..."], ...],
        send: Int[np.ndarray, "devices devices"],
        recv: Int[np.ndarray, "devices devices"],
    ) -> tuple[jax.Array, ...]:
        used = (send >= 0).any(axis=0) | (recv >= 0).any(axis=0)
        if not used.any():
            return weights
        table = NamedSharding(self.mesh, P(EXPERT_AXIS))
        return self.compile()(
            tuple(weights),
            jax.device_put(send.astype(np.int32), table),
            jax.device_put(recv.astype(np.int32), table),
            jax.device_put(used, NamedSharding(self.mesh, P())),
        )


class SlotWriter:
    """Writes host-held expert weights into chosen slots (one slot per device per call)."""

    def __init__(self, mesh: Mesh, weight_shapes: Sequence[jax.ShapeDtypeStruct]):
        self.mesh = mesh
        spec = P(EXPERT_AXIS)
        sharded = NamedSharding(mesh, spec)
        n = mesh.devices.size
        self._weights = tuple(
            jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharded) for w in weight_shapes
        )
        self._values = tuple(
            jax.ShapeDtypeStruct((n, *w.shape[1:]), w.dtype, sharding=sharded)
            for w in weight_shapes
        )
        self._executable = None
        self._lock = threading.Lock()

        def write_local(weights, slot, values):
            slot = slot[0]
            safe = jnp.clip(slot, 0, weights[0].shape[0] - 1)
            out = []
            for w, v in zip(weights, values, strict=True):
                written = jax.lax.dynamic_update_index_in_dim(w, v[0].astype(w.dtype), safe, 0)
                out.append(jnp.where(slot >= 0, written, w))
            return tuple(out)

        body = jax.shard_map(write_local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
        self._write = jax.jit(body, donate_argnums=(0,))

    def compile(self):
        with self._lock:
            return self._compile()

    def _compile(self):
        if self._executable is None:
            n = self.mesh.devices.size
            slot = jax.ShapeDtypeStruct(
                (n,), np.int32, sharding=NamedSharding(self.mesh, P(EXPERT_AXIS))
            )
            self._executable = self._write.lower(self._weights, slot, self._values).compile()
        return self._executable

    def __call__(
        self,
        weights: tuple[jax.Array, ...],
        slot: Int[np.ndarray, " devices"],
        values: Sequence[Callable[[int], np.ndarray | None]],
    ) -> tuple[jax.Array, ...]:
        """slot[d]: local slot of device d to write (-1 = none); values[k](d): weight k's value
        for device d, or None where slot[d] < 0."""
        sharding = NamedSharding(self.mesh, P(EXPERT_AXIS))
        devices = list(self.mesh.devices.flat)
        stacked = []
        for k, w in enumerate(weights):
            shape = (1, *w.shape[1:])
            buffers = []
            for d, device in enumerate(devices):
                value = values[k](d) if slot[d] >= 0 else None
                if value is None:
                    buffers.append(_device_zeros(shape, w.dtype, device))
                else:
                    buffers.append(jax.device_put(np.asarray(value)[None], device))
            stacked.append(
                jax.make_array_from_single_device_arrays(
                    (len(devices), *w.shape[1:]), sharding, buffers
                )
            )
        slots = jax.device_put(slot.astype(np.int32), sharding)
        return self.compile()(tuple(weights), slots, tuple(stacked))
