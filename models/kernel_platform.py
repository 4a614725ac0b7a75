"""Where the project's Pallas kernels run.

On the GPU they are compiled by Triton. Elsewhere the model takes XLA's ops (and, for invariant
numerics, products in a fixed order), unless ELASTIC_MOE_KERNELS=interpret asks for the GPU's
kernel path run by Pallas's interpreter: slow, for tests, so that the kernels' tiles, masks,
padding and their composition in the model are checked on a machine without a GPU. Read when a
program is traced.
"""

from __future__ import annotations

import os

import jax

CHOICES = ("auto", "interpret")


def _choice() -> str:
    choice = os.environ.get("ELASTIC_MOE_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"ELASTIC_MOE_KERNELS must be one of {CHOICES}, got {choice!r}")
    return choice


def kernels_here() -> bool:
    """Does the model take its kernel path here (the GPU, or interpreted on request)?"""
    return jax.default_backend() == "gpu" or _choice() == "interpret"


def interpreted() -> bool:
    """Run the kernels by the interpreter (anywhere but the GPU)."""
    return jax.default_backend() != "gpu"


def check_vma() -> bool:
    """shard_map's check of varying mesh axes, for the programs that hold the model: off only
    when the kernels run interpreted, whose loads trip it (JAX names check_vma=False as the
    workaround); it checks types, the computation is the same."""
    return not (kernels_here() and interpreted())
