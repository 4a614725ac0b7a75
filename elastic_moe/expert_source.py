"""Where an expert whose replicas all died comes back from: the host copy of the expert
weights, or, when the engine keeps no host copy of them, the checkpoint (the last resort)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from models.config import ModelConfig
from models.params import Params, expert_weight_names, expert_weights, moe_layer_indices


class ExpertSource:
    def __init__(
        self, cfg: ModelConfig, host_params: Params, checkpoint: str | os.PathLike | None = None
    ):
        self.cfg, self.host_params, self.checkpoint = cfg, host_params, checkpoint
        self.read_from_checkpoint = 0  # experts restored from the checkpoint so far

    def has_host_copy(self) -> bool:
        first = moe_layer_indices(self.cfg)[0]
        return expert_weights(self.host_params, first)["w_gate"] is not None

    def fetch(self, layer: int, experts: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """{expert: {"w_gate", "w_up", "w_down"} (+ biases, expert_weight_names)} of MoE layer
        `layer` (host numpy)."""
        decoder_layer = moe_layer_indices(self.cfg)[layer]
        host = expert_weights(self.host_params, decoder_layer)
        if host["w_gate"] is not None:
            names = expert_weight_names(self.cfg)
            return {int(e): {n: host[n][e] for n in names} for e in experts}
        if self.checkpoint is None:
            raise RuntimeError("no host copy of the experts and no checkpoint to restore them")
        # Imported here: orbax is heavy, and importing it configures the root logger.
        from elastic_moe.checkpoint import restore_experts

        restored = restore_experts(self.checkpoint, self.cfg, [(layer, int(e)) for e in experts])
        self.read_from_checkpoint += len(restored)
        return {e: restored[(layer, e)] for _, e in restored}


def without_host_experts(cfg: ModelConfig, host_params: Params) -> Params:
    """A copy of the parameter tree whose routed-expert arrays are dropped (None): the dense
    weights stay on the host, the experts live only on the devices and in the checkpoint."""

    def copy(tree):
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    light = copy(host_params)
    for i in moe_layer_indices(cfg):
        for name in expert_weight_names(cfg):
            expert_weights(light, i)[name] = None
    return light
