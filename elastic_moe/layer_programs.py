"""A step as a chain of programs, one per layer, so that a mesh's compile does not grow with depth.

The whole-step program (elastic_moe.steps) unrolls every layer, and XLA's compile time grows
with it: 1.2-1.3 s per layer and mesh on a 2-core CPU (DeepSeek-V3's 61 layers: 86 s per mesh,
benchmarks/RESULTS.md). Here a step runs an embedding program, then programs of G decoder
layers each (`StepGeometry.layers_per_program`), then a head program that also picks the
tokens. Layers of one kind (dense or MoE, and gpt-oss's sliding window) have the same shapes,
so a run of them is cut into groups of G and every full group shares one executable (a shorter
last group has one of its own): a mesh compiles a handful of programs of at most G layers
whatever the depth, and the standby compiles of every mesh one failure away stay cheap. What
it costs: a launch per group instead of one per step (on one H100, G = 1 at 8 layers: the same
device time, 0.07 ms more host time a layer), and no fusion across a group boundary.

A MoE layer program finds its placement tables by a layer index held on the devices (one
replicated int32 per MoE layer), so that one executable serves every MoE layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elastic_moe.step_io import StepOutput, global_token_ids
from mesh.device_mesh import EXPERT_AXIS
from mesh.sharding import BATCH, REPLICATED
from models.config import ModelConfig
from models.kernel_platform import check_vma
from models.kv_cache import LayerCache
from models.moe import ExpertTables
from models.params import cached_per_config
from models.row_invariant import row_invariant_matmuls
from models.sampling import sample
from models.transformer import MoETransformer, output_logits

LayerKind = tuple[bool, int | None]  # (is MoE, sliding window)
GroupKey = tuple[LayerKind, int]  # (kind, layers in the group): one executable each


def layer_groups(cfg: ModelConfig, per_program: int) -> list[tuple[GroupKey, list[int]]]:
    """The decoder layers cut into runs of one kind, each run into groups of at most
    `per_program` layers: [((kind, size), layer indices)] in order."""
    groups: list[tuple[GroupKey, list[int]]] = []
    for i in range(cfg.num_layers):
        kind = layer_kind(cfg, i)
        if groups and groups[-1][0][0] == kind and len(groups[-1][1]) < per_program:
            groups[-1][1].append(i)
        else:
            groups.append(((kind, 0), [i]))
    return [((kind, len(layers)), layers) for (kind, _), layers in groups]


def layer_kind(cfg: ModelConfig, index: int) -> LayerKind:
    """Layers of one kind run the same program."""
    window = cfg.window_of_layer(index) if cfg.attention_sinks else None
    return index >= cfg.first_dense_layers, window


@cached_per_config
def _graphs(cfg: ModelConfig) -> tuple[dict[LayerKind, nnx.GraphDef], nnx.GraphDef]:
    """The graph of one decoder layer of each kind, and of the final norm (asked by the
    decode and the prefill programs of every mesh)."""
    model = nnx.eval_shape(lambda: MoETransformer(cfg, cfg.num_experts, rngs=nnx.Rngs(0)))
    layers: dict[LayerKind, nnx.GraphDef] = {}
    for i, layer in enumerate(model.layers):
        layers.setdefault(layer_kind(cfg, i), nnx.split(layer)[0])
    return layers, nnx.split(model.final_norm)[0]


def head_params(params: dict) -> dict:
    """What the head program reads: the final norm and the LM head (or the tied embedding,
    [vocab, d], transposed in the program as the whole step does)."""
    head = params["lm_head"]["kernel"] if params.get("lm_head") else params["embed"]
    return {"final_norm": params["final_norm"], "head": head}


class LayerPrograms:
    """The jit-wrapped embedding, layer-group and head programs of one mesh, for decode
    (rows=None) or prefill; `compile` gives the callable the whole-step program would be."""

    def __init__(
        self,
        cfg: ModelConfig,
        mesh: Mesh,
        param_specs: dict,
        numerics: str,
        sampling_spec: Any,
        decode: bool,
        per_program: int = 1,
    ):
        self.cfg, self.mesh, self.decode = cfg, mesh, decode
        layer_graphs, norm_graph = _graphs(cfg)
        self.groups = layer_groups(cfg, per_program)
        rows_spec = None if decode else BATCH
        invariant = numerics == "invariant"

        def embed(embedding, tokens, positions):
            if decode:
                tokens, positions = tokens[:, None], positions[:, None]
            return jnp.take(embedding, tokens, axis=0), positions

        self.embed = jax.jit(
            jax.shard_map(
                embed,
                mesh=mesh,
                in_specs=(param_specs["embed"], BATCH, BATCH),
                out_specs=(BATCH, BATCH),
            )
        )

        def group_program(key: GroupKey) -> Callable:
            (kind, size), first_layer = key, next(g[1][0] for g in self.groups if g[0] == key)
            graph = layer_graphs[kind]
            is_moe = kind[0]

            def run(params, caches, log2phy, replica_count, js, x, positions, rows):
                token_ids = global_token_ids(*x.shape[:2])
                new_caches, loads = [], []
                for layer_params, cache, j in zip(params, caches, js, strict=True):
                    layer = nnx.merge(graph, layer_params)
                    tables = ExpertTables(log2phy[j], replica_count[j]) if is_moe else None
                    with row_invariant_matmuls(invariant):
                        x, cache, load = layer(
                            x, positions, cache, rows, tables, token_ids, EXPERT_AXIS, numerics
                        )
                    new_caches.append(cache)
                    loads.append(load)
                return x, new_caches, loads if is_moe else None

            layer_spec = param_specs["layers"][first_layer]
            caches_spec = [LayerCache(BATCH, BATCH)] * size
            in_specs = ([layer_spec] * size, caches_spec, P(), P(), [P()] * size)
            out_specs = (BATCH, caches_spec, [REPLICATED] * size if is_moe else None)
            return jax.jit(
                jax.shard_map(
                    run,
                    mesh=mesh,
                    in_specs=(*in_specs, BATCH, BATCH, rows_spec),
                    out_specs=out_specs,
                    check_vma=check_vma(),
                ),
                donate_argnums=(1,),
            )

        self.layers = {key: group_program(key) for key in dict.fromkeys(k for k, _ in self.groups)}

        def head(params, x, last, sampling, loads):
            if decode:
                last = jnp.zeros(x.shape[0], jnp.int32)
            final_norm = nnx.merge(norm_graph, params["final_norm"])
            with row_invariant_matmuls(invariant):
                head = params["head"].T if cfg.tie_embeddings else params["head"]
                logits = output_logits(final_norm, head, x, last, numerics)
            with jax.named_scope("sampling"):
                tokens, logprobs = sample(logits, *sampling, numerics, draw=False)
            return tokens, logprobs, logits, jnp.stack(loads)

        head_specs = head_params(param_specs)
        loads_spec = [REPLICATED] * cfg.num_moe_layers
        self.head = jax.jit(
            jax.shard_map(
                head,
                mesh=mesh,
                in_specs=(head_specs, BATCH, rows_spec, sampling_spec, loads_spec),
                out_specs=(BATCH, BATCH, BATCH, REPLICATED),
                check_vma=check_vma(),
            )
        )
        self._layer_index = None  # device-resident MoE layer indices, made at the first call

    def compile(self, abstract: Callable[..., tuple]) -> LayerChain:
        """Lowers and compiles every program from the abstract arguments of the whole step
        (`abstract()` returns params, cache, log2phy, replica_count, tokens, positions, rows,
        last, sampling as jax.ShapeDtypeStructs)."""
        params, cache, log2phy, counts, tokens, positions, rows, last, sampling = abstract()
        embed = self.embed.lower(params["embed"], tokens, positions)
        x, pos = embed.out_info
        embed = embed.compile()
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.mesh, P()))
        layers, loads = {}, []
        for key, program in self.layers.items():
            group = next(g for k, g in self.groups if k == key)
            lowered = program.lower(
                [params["layers"][i] for i in group],
                [cache[i] for i in group],
                log2phy,
                counts,
                [index] * len(group),
                x,
                pos,
                rows,
            )
            layers[key] = lowered.compile()
            if key[0][0]:  # MoE
                loads = [lowered.out_info[2][0]] * self.cfg.num_moe_layers
        head = self.head.lower(head_params(params), x, last, sampling, loads)
        return LayerChain(self, embed, layers, head.compile(), head.out_info[2])

    def layer_index(self) -> list[jax.Array]:
        if self._layer_index is None:
            replicated = NamedSharding(self.mesh, P())
            self._layer_index = [
                jax.device_put(np.int32(j), replicated) for j in range(self.cfg.num_moe_layers)
            ]
        return self._layer_index


class LayerChain:
    """The compiled programs of a step, called like the whole-step executable: decode takes
    (params, cache, log2phy, replica_count, tokens, positions, sampling), prefill adds rows
    and last before sampling. Returns a StepOutput."""

    def __init__(self, programs: LayerPrograms, embed, layers: dict, head, logits_info):
        self.programs, self.embed, self.layers, self.head = programs, embed, layers, head
        self.logits_info = logits_info  # shape, dtype and sharding of the step's logits

    def __call__(self, params, cache, log2phy, replica_count, tokens, positions, *rest):
        rows, last, sampling = (None, None, *rest) if self.programs.decode else rest
        x, pos = self.embed(params["embed"], tokens, positions)
        index = self.programs.layer_index()
        first_moe = self.programs.cfg.first_dense_layers
        new_cache, loads = [], []
        for key, group in self.programs.groups:
            js = [index[max(i - first_moe, 0)] for i in group]  # dense layers ignore theirs
            x, caches, group_loads = self.layers[key](
                [params["layers"][i] for i in group],
                [cache[i] for i in group],
                log2phy,
                replica_count,
                js,
                x,
                pos,
                rows,
            )
            new_cache += caches
            loads += group_loads or []
        tokens, logprobs, logits, expert_load = self.head(
            head_params(params), x, last, sampling, loads
        )
        return StepOutput(tokens, logprobs, logits, new_cache, expert_load)

    def as_text(self) -> str:
        """Every program's HLO, one after another."""
        return "\n".join(c.as_text() for c in (self.embed, *self.layers.values(), self.head))
