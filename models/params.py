"""Parameters as plain nested dicts of arrays, and where the routed experts sit in them.

The *logical* parameters hold each MoE layer's experts as [num_experts, ...] (what a checkpoint
stores); a deployment gathers them into physical slots with a placement's `phy2log`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.transformer import MoETransformer

Params = dict[str, Any]
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# gpt-oss's per-expert biases: b_gate/b_up [num_experts, f], b_down [num_experts, d].
EXPERT_BIASES = ("b_gate", "b_up", "b_down")


def expert_weight_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Every per-expert array of a MoE layer: what a slot holds and what moves, is checksummed,
    restored and saved with its expert."""
    return EXPERT_WEIGHTS + EXPERT_BIASES if cfg.expert_bias else EXPERT_WEIGHTS


def cached_per_config(build):
    """`build(cfg, ...)` kept per (hashable) arguments: the abstract model takes about 1 s at
    61 layers, and each mesh's programs ask for it several times."""
    cached = functools.lru_cache(maxsize=16)(build)

    @functools.wraps(build)
    def get(*args):
        try:
            return cached(*args)
        except TypeError:  # a config with an unhashable field
            return build(*args)

    return get


@cached_per_config
def _abstract_model(cfg: ModelConfig, num_slots: int | None) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and abstract state of the model, without allocating weights."""
    abstract = nnx.eval_shape(
        lambda: MoETransformer(cfg, num_slots or cfg.num_experts, rngs=nnx.Rngs(0))
    )
    graph, state = nnx.split(abstract)
    return graph, state


def model_graph(cfg: ModelConfig, num_slots: int | None = None) -> nnx.GraphDef:
    """The model's structure (shapes don't enter the graph)."""
    return _abstract_model(cfg, num_slots)[0]


def abstract_params(cfg: ModelConfig, num_slots: int | None = None) -> Params:
    """Shapes and dtypes (jax.ShapeDtypeStruct leaves) of the parameters."""
    return nnx.to_pure_dict(_abstract_model(cfg, num_slots)[1])


def logical_axes(cfg: ModelConfig) -> Params:
    """For every parameter, its logical axis names (a tuple with one entry per dimension)."""
    state = _abstract_model(cfg, None)[1]
    axes = jax.tree.map(
        lambda v: tuple(v.get_metadata().get("logical_axes") or (None,) * v.value.ndim),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.to_pure_dict(axes)


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
    """Random logical parameters as numpy arrays (host memory)."""
    model = MoETransformer(cfg, cfg.num_experts, rngs=nnx.Rngs(seed))
    pure = nnx.to_pure_dict(nnx.split(model)[1])
    return jax.tree.map(np.asarray, pure)


def moe_layer_indices(cfg: ModelConfig) -> list[int]:
    return list(range(cfg.first_dense_layers, cfg.num_layers))


def expert_weights(params: Params, layer: int) -> dict[str, Any]:
    """The routed-expert arrays of decoder layer `layer`: {'w_gate', 'w_up', 'w_down'} (and
    the biases, see expert_weight_names)."""
    return params["layers"][layer]["mlp"]["experts"]


def iter_expert_paths(cfg: ModelConfig) -> Iterator[tuple[int, int, str]]:
    """(moe layer index j, decoder layer index i, weight name) for every routed-expert array."""
    for j, i in enumerate(moe_layer_indices(cfg)):
        for name in expert_weight_names(cfg):
            yield j, i, name


def path_keys(path: tuple) -> list:
    """The dict keys of a jax tree path (what tree_map_with_path passes)."""
    return [getattr(p, "key", p) for p in path]


def is_expert_path(path: tuple) -> bool:
    """True for the routed-expert arrays, which live in physical slots once deployed."""
    return "experts" in path_keys(path)


def synthetic_params(cfg: ModelConfig, seed: int = 0, block: int = 1 << 20) -> Params:
    """Random-looking logical parameters made fast, for timing real shapes only: one block of
    normal(0, 0.02) values tiled over every array (norm scales are ones). Their outputs are
    noise; use init_params for a model whose numbers matter."""
    rng = np.random.default_rng(seed)
    tile = rng.normal(0.0, 0.02, size=block).astype(np.float32)
    tiles: dict = {}

    def fill(path, leaf):
        if path_keys(path)[-1] == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        typed = tiles.setdefault(leaf.dtype, tile.astype(leaf.dtype))
        out = np.empty(leaf.shape, leaf.dtype)
        flat = out.reshape(-1)
        for start in range(0, flat.size, block):
            chunk = flat[start : start + block]
            chunk[...] = typed[: chunk.size]
        return out

    return jax.tree_util.tree_map_with_path(fill, abstract_params(cfg))
