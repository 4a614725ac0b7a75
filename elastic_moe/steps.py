"""The prefill and decode programs of one mesh, built with shard_map and compiled ahead of time.

Attention is data-parallel (each device runs its own request slots against its own KV cache);
the MoE layers are expert-parallel (tokens gathered, local slots computed, results scattered
back). The placement tables are inputs, so one executable serves every placement of its mesh.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elastic_moe.layer_programs import LayerChain, LayerPrograms
from elastic_moe.step_io import Sampling, StepOutput, global_token_ids
from mesh.device_mesh import EXPERT_AXIS
from mesh.sharding import BATCH, REPLICATED, named, param_specs
from models.config import ModelConfig
from models.kernel_platform import check_vma
from models.kv_cache import LayerCache, cache_shapes, empty_cache
from models.moe import NUMERICS_MODES
from models.params import abstract_params, logical_axes, model_graph
from models.sampling import sample


@dataclass(frozen=True)
class StepGeometry:
    """Sizes that fix the shapes of one mesh's programs."""

    num_devices: int
    expert_slots_per_device: int
    request_slots_per_device: int
    prefill_rows_per_device: int
    max_replicas: int
    numerics: str = "invariant"  # one of NUMERICS_MODES (models.moe)
    # G > 0: programs of G layers of one kind, chained per step (elastic_moe.layer_programs):
    # compile time flat in depth, one launch per group. 0: one program per step, every layer
    # unrolled in it.
    layers_per_program: int = 0

    def __post_init__(self) -> None:
        if self.numerics not in NUMERICS_MODES:
            raise ValueError(f"numerics must be one of {NUMERICS_MODES}, got {self.numerics!r}")
        if self.layers_per_program < 0:
            raise ValueError(f"layers_per_program must be >= 0, got {self.layers_per_program}")

    @property
    def num_expert_slots(self) -> int:
        return self.num_devices * self.expert_slots_per_device

    @property
    def num_request_slots(self) -> int:
        return self.num_devices * self.request_slots_per_device

    @property
    def num_prefill_rows(self) -> int:
        return self.num_devices * self.prefill_rows_per_device


def _local_forward(graphdef, cfg: ModelConfig, numerics: str):
    def forward(params, cache, log2phy, replica_count, tokens, positions, rows, last, sampling):
        model = nnx.merge(graphdef, params)
        b, c = tokens.shape
        token_ids = global_token_ids(b, c)
        logits, cache, load = model(
            tokens,
            positions,
            cache,
            rows,
            log2phy,
            replica_count,
            token_ids,
            last,
            axis_name=EXPERT_AXIS,
            numerics=numerics,
        )
        with jax.named_scope("sampling"):
            next_tokens, logprobs = sample(logits, *sampling, numerics, draw=False)
        return StepOutput(next_tokens, logprobs, logits, cache, load)

    return forward


class MeshPrograms:
    """jit-compiled prefill/decode for one mesh, with AOT `compile_*` for standby builds."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, geometry: StepGeometry):
        self.cfg, self.mesh, self.geometry = cfg, mesh, geometry
        self.param_specs = param_specs(logical_axes(cfg))
        self.param_shardings = named(mesh, self.param_specs)
        cache_spec = [LayerCache(BATCH, BATCH) for _ in range(cfg.num_layers)]
        self.cache_shardings = named(mesh, cache_spec)
        self.batch = NamedSharding(mesh, BATCH)
        self.replicated = NamedSharding(mesh, REPLICATED)
        forward = _local_forward(model_graph(cfg), cfg, geometry.numerics)
        self.sampling_spec = sampling_spec = Sampling(*([BATCH] * 5))
        out_spec = StepOutput(BATCH, BATCH, BATCH, cache_spec, REPLICATED)

        def sharded(rows_spec):
            in_specs = (self.param_specs, cache_spec, P(), P(), BATCH, BATCH, rows_spec, BATCH)
            return jax.shard_map(
                forward,
                mesh=mesh,
                in_specs=(*in_specs, sampling_spec),
                out_specs=out_spec,
                check_vma=check_vma(),
            )

        decode_body = sharded(None)

        def decode(params, cache, log2phy, replica_count, tokens, positions, sampling):
            last = jnp.zeros_like(tokens)
            return decode_body(
                params,
                cache,
                log2phy,
                replica_count,
                tokens[:, None],
                positions[:, None],
                None,
                last,
                sampling,
            )

        self.decode = jax.jit(decode, donate_argnums=(1,))
        # Built on the devices, each holding only its shard: never the whole cache on one.
        self._empty_cache = jax.jit(
            lambda: empty_cache(cfg, geometry.num_request_slots),
            out_shardings=self.cache_shardings,
        )
        self.prefill = jax.jit(sharded(BATCH), donate_argnums=(1,))

        def draw(logits, sampling):
            return sample(logits, *sampling, geometry.numerics)

        # The sampled rows of a step, drawn only when it has any (models.sampling says why).
        self.draw = jax.jit(
            jax.shard_map(
                draw, mesh=mesh, in_specs=(BATCH, sampling_spec), out_specs=(BATCH, BATCH)
            )
        )
        self._compiled: dict[Any, Any] = {}
        self._layer_programs: dict[bool, LayerPrograms] = {}  # by decode (True) / prefill
        # Standby compiles run on a background thread; a foreground caller waits for them.
        self._compile_lock = threading.Lock()

    def empty_cache(self) -> list[LayerCache]:
        """A zeroed KV cache for this mesh's request slots."""
        return self._empty_cache()

    # Abstract inputs, for ahead-of-time compilation.
    def _abstract_common(self) -> tuple:
        g, cfg = self.geometry, self.cfg
        params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_params(cfg, g.num_expert_slots),
            self.param_shardings,
        )
        cache = [
            LayerCache(*(jax.ShapeDtypeStruct(*kv, sharding=self.batch) for kv in layer))
            for layer in cache_shapes(cfg, g.num_request_slots)
        ]
        moe, e, r = cfg.num_moe_layers, cfg.num_experts, g.max_replicas
        log2phy = jax.ShapeDtypeStruct((moe, e, r), jnp.int32, sharding=self.replicated)
        counts = jax.ShapeDtypeStruct((moe, e), jnp.int32, sharding=self.replicated)
        return params, cache, log2phy, counts

    def _abstract_rows(self, shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch)

    def _abstract_sampling(self, b: int) -> Sampling:
        row = self._abstract_rows
        return Sampling(
            row((b,), jnp.float32),
            row((b,)),
            row((b,), jnp.float32),
            row((b,), jnp.uint32),
            row((b,)),
        )

    def compile_decode(self):
        """The AOT-compiled decode executable (built once, then reused)."""
        with self._compile_lock:
            return self._compile_decode()

    def abstract_decode_args(self) -> tuple:
        """The decode program's arguments as shapes and shardings (to lower it)."""
        b = self.geometry.num_request_slots
        row = self._abstract_rows
        return (*self._abstract_common(), row((b,)), row((b,)), self._abstract_sampling(b))

    def _compile_decode(self):
        return self._compile_step("decode", self.decode, self.abstract_decode_args, decode=True)

    def _compile_step(self, key, program, abstract_args, decode: bool):
        """The step program under `key`, compiled once with its sampling program: the jitted
        whole-step `program` lowered from `abstract_args()`, or the layer-group chain."""
        if key not in self._compiled:
            if self.geometry.layers_per_program:
                self._compiled[key] = self._compile_chain(decode, abstract_args)
            else:
                lowered = program.lower(*abstract_args())
                self._compile_draw(lowered.out_info.logits)
                self._compiled[key] = lowered.compile()
        return self._compiled[key]

    def _compile_chain(self, decode: bool, abstract_args) -> LayerChain:
        """The step as programs of a few layers each (StepGeometry.layers_per_program)."""
        if decode not in self._layer_programs:
            self._layer_programs[decode] = LayerPrograms(
                self.cfg,
                self.mesh,
                self.param_specs,
                self.geometry.numerics,
                self.sampling_spec,
                decode,
                self.geometry.layers_per_program,
            )

        def abstract() -> tuple:
            args = abstract_args()
            return (*args[:6], None, None, args[6]) if decode else args

        chain = self._layer_programs[decode].compile(abstract)
        self._compile_draw(chain.logits_info)
        return chain

    def _compile_draw(self, logits: jax.ShapeDtypeStruct) -> None:
        """The sampling program for the logits of a decode or prefill (compiled with it, so a
        step that samples never compiles on the serving path)."""
        rows = logits.shape[0]
        if ("draw", rows) not in self._compiled:
            args = (
                jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=self.batch),
                self._abstract_sampling(rows),
            )
            self._compiled["draw", rows] = self.draw.lower(*args).compile()

    def compiled_draw(self, rows: int):
        """The sampling program for `rows` rows of logits (built by compile_decode or
        compile_prefill)."""
        with self._compile_lock:
            return self._compiled["draw", rows]

    def compile_prefill(self, length: int):
        """The AOT-compiled prefill executable for prompts padded to `length`."""
        with self._compile_lock:
            return self._compile_prefill(length)

    def abstract_prefill_args(self, length: int) -> tuple:
        """The prefill program's arguments for prompts padded to `length`, as shapes."""
        p = self.geometry.num_prefill_rows
        row = self._abstract_rows
        return (
            *self._abstract_common(),
            row((p, length)),
            row((p, length)),
            row((p,)),
            row((p,)),
            self._abstract_sampling(p),
        )

    def _compile_prefill(self, length: int):
        args = functools.partial(self.abstract_prefill_args, length)
        return self._compile_step(("prefill", length), self.prefill, args, decode=False)

    @property
    def compiled_count(self) -> int:
        return len(self._compiled)
