"""The reference checksum of every logical expert, taken from the host copy at start-up.

A slot that a reconfiguration wrote must hold, bit for bit, the expert its placement names;
comparing its on-device checksum (mesh.slot_checksum) with this reference proves it without
copying the weights back. The reference comes from the host copy the engine deployed from (or
the checkpoint it loaded), before the engine drops the host experts when it keeps no copy.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import UInt32

from mesh.slot_checksum import host_checksums
from models.config import ModelConfig
from models.params import EXPERT_WEIGHTS, Params, expert_weights, moe_layer_indices


class ExpertChecksums:
    def __init__(self, cfg: ModelConfig, host_params: Params):
        per_layer = []
        for i in moe_layer_indices(cfg):
            host = expert_weights(host_params, i)
            per_layer.append(np.stack([host_checksums(host[n]) for n in EXPERT_WEIGHTS], axis=-1))
        # [moe_layers, experts, weights]: one checksum per expert weight (EXPERT_WEIGHTS order)
        self.table: UInt32[np.ndarray, "layers experts weights"] = np.stack(per_layer)

    def expected(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """[len(experts), weights] the checksums the slots holding `experts` must show."""
        return self.table[layer, experts]

    def identify(self, layer: int, found: np.ndarray) -> int:
        """The expert whose weights have checksums `found` ([weights]), or -1 for none."""
        hits = np.flatnonzero((self.table[layer] == found).all(axis=1))
        return int(hits[0]) if hits.size else -1
