"""The reference checksum of every logical expert, taken when the experts are first deployed.

A slot that a reconfiguration wrote must hold, bit for bit, the expert its placement names;
comparing its on-device checksum (mesh.slot_checksum) with this reference proves it without
copying the weights back. The reference is taken on the devices right after the deploy from the
host copy (or the checkpoint): a plain host-to-device copy, where the planned transfers that
this guards against have not run yet. Every replica of an expert must agree then, or the deploy
is refused. Taking it on the host instead costs a pass over every expert weight in numpy
(0.2 GB/s measured on this project's CPU machine: minutes for a 30B model), against
milliseconds on the devices.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import UInt32

from elastic_moe.reconfiguration import ExpertIntegrityError
from mesh.placement import Placement


class ExpertChecksums:
    def __init__(self, table: UInt32[np.ndarray, "layers experts weights"]):
        # One checksum per expert array (models.params.expert_weight_names order).
        self.table = table

    @classmethod
    def from_deployment(
        cls, placement: Placement, found: UInt32[np.ndarray, "layers slots weights"]
    ) -> ExpertChecksums:
        """From the checksums of every slot of a fresh deploy (ServingMesh.slot_checksums);
        raises ExpertIntegrityError when two replicas of an expert differ."""
        layers, experts = placement.num_layers, placement.num_experts
        table = np.zeros((layers, experts, found.shape[-1]), np.uint32)
        for j in range(layers):
            first = placement.log2phy[j, :, 0]  # every expert has a replica in column 0
            table[j] = found[j, first]
            wrong = np.flatnonzero((found[j] != table[j, placement.phy2log[j]]).any(axis=1))
            if wrong.size:
                raise ExpertIntegrityError(
                    f"MoE layer {j}: replicas of experts "
                    f"{sorted(set(placement.phy2log[j, wrong].tolist()))} differ right after "
                    "the deploy (slots " + ", ".join(map(str, wrong.tolist())) + ")"
                )
        return cls(table)

    def expected(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """[len(experts), weights] the checksums the slots holding `experts` must show."""
        return self.table[layer, experts]

    def identify(self, layer: int, found: np.ndarray) -> int:
        """The expert whose weights have checksums `found` ([weights]), or -1 for none."""
        hits = np.flatnonzero((self.table[layer] == found).all(axis=1))
        return int(hits[0]) if hits.size else -1
