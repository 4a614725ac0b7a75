"""`elastic-moe presets`: the models `--preset` accepts, with their shapes.

Reads configs only (no jax, no weights), so it answers at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from serve.cli_common import make_console, print_json


def preset_rows() -> list[dict[str, Any]]:
    """One row per named model: random-weight presets first, then the trained models."""
    from models.presets import PRESETS, trained_configs

    named = [(cfg, "random") for cfg in PRESETS.values()]
    named += [(cfg, "trained") for cfg in trained_configs().values()]
    return [
        {
            "name": cfg.name,
            "weights": weights,
            "architecture": cfg.architecture,
            "layers": cfg.num_layers,
            "d_model": cfg.d_model,
            "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "attention": cfg.attention,
            "experts": cfg.num_experts,
            "experts_per_token": cfg.experts_per_token,
            "expert_d_ff": cfg.moe_d_ff,
            "shared_experts": cfg.num_shared_experts,
            "vocab_size": cfg.vocab_size,
            "max_seq_len": cfg.max_seq_len,
            "dtype": cfg.dtype,
            "expert_mb": cfg.expert_bytes() / 2**20,
        }
        for cfg, weights in named
    ]


def run_presets(args: argparse.Namespace) -> int:
    rows = preset_rows()
    if args.json:
        print_json({"presets": rows})
        return 0
    from rich.table import Table

    table = Table(box=None, padding=(0, 1), header_style="bold")
    for column in ("name", "weights", "architecture", "layers", "d_model", "heads (kv)"):
        table.add_column(column)
    for column in ("experts (top-k)", "expert d_ff", "vocab", "context", "dtype"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["name"],
            r["weights"],
            r["architecture"] + (" (MLA)" if r["attention"] == "mla" else ""),
            str(r["layers"]),
            str(r["d_model"]),
            f"{r['heads']} ({r['kv_heads']})",
            f"{r['experts']} ({r['experts_per_token']})"
            + (f" + {r['shared_experts']} shared" if r["shared_experts"] else ""),
            str(r["expert_d_ff"]),
            str(r["vocab_size"]),
            str(r["max_seq_len"]),
            r["dtype"],
        )
    console = make_console()
    console.print(table)
    console.print(
        "random: random weights (seed 0), for tests, the demo and benchmarks: text is noise"
    )
    console.print("trained: checkpoints the project trained (models/trained/): readable text")
    return 0
