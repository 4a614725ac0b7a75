"""Slot checksums: the device program and numpy agree bit for bit, only listed slots are read,
and a deploy whose replicas differ is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from elastic_moe.expert_checksums import ExpertChecksums
from elastic_moe.reconfiguration import ExpertIntegrityError
from mesh.device_mesh import EXPERT_AXIS, build_mesh
from mesh.placement import place
from mesh.slot_checksum import SlotChecksums, host_checksums


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_device_and_host_checksums_agree(devices, dtype):
    mesh = build_mesh(devices[:4])
    rng = np.random.default_rng(0)
    weights = [
        rng.standard_normal((8, 5, 7)).astype(dtype),
        rng.standard_normal((8, 3)).astype(dtype),
    ]
    sharded = tuple(jax.device_put(w, NamedSharding(mesh, P(EXPERT_AXIS))) for w in weights)
    program = SlotChecksums(mesh, [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights])
    local = np.array([[1, 0], [0, -1], [-1, -1], [1, -1]])  # listed first, then -1
    found = program(sharded, local)
    for k, w in enumerate(weights):
        want = host_checksums(w)
        for d in range(4):
            for i in range(2):
                expected = want[2 * d + local[d, i]] if local[d, i] >= 0 else 0  # unlisted: 0
                assert found[k, d, i] == expected, (k, d, i)


def test_checksums_tell_experts_and_positions_apart():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 4, 6)).astype(np.float32)
    swapped = w.copy()
    swapped[0, 0, :2] = swapped[0, 0, 1::-1]  # two values trade places
    flipped = w.copy()
    flipped.view(np.uint32)[1, 2, 3] ^= 1  # one bit
    base = host_checksums(w)
    assert len(set(base.tolist())) == 3
    assert host_checksums(swapped)[0] != base[0] and host_checksums(flipped)[1] != base[1]


def test_a_deploy_whose_replicas_differ_is_refused():
    placement = place(np.ones((1, 4)), 2, 3, 2)  # 6 slots, 4 experts: 2 have two replicas
    found = (placement.phy2log[..., None] * 10 + np.arange(3)).astype(np.uint32)
    table = ExpertChecksums.from_deployment(placement, found).table
    assert (table[0, :, 0] == np.arange(4) * 10).all()
    twice = next(e for e in range(4) if placement.replica_count[0, e] > 1)
    slot = int(placement.log2phy[0, twice, 1])
    found[0, slot, 2] += 1
    with pytest.raises(ExpertIntegrityError, match=f"replicas of experts \\[{twice}\\] differ"):
        ExpertChecksums.from_deployment(placement, found)
