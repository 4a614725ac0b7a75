"""Does launching a decode step return before the step is done? Prints, for the decode program
of a preset on the first device: how long the call takes to return and how long to the step's
result, the compiled program's ops that make the host wait (while loops and conditionals run on
the host in XLA's GPU runtime, each iteration copying its predicate back), and its custom-call
targets. --hlo writes the compiled program's text there.

  python benchmarks/probe_dispatch.py --preset qwen3-30b-a3b --layers 8 --batch 64
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (  # noqa: E402
    back_to_back,
    full_batch_decode_inputs,
    model_to_time,
    simulate_devices_unless_gpu,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hlo", default="", help="write the compiled decode program's text here")
    args = p.parse_args()
    simulate_devices_unless_gpu(1)
    import jax
    import numpy as np

    from elastic_moe import Engine, EngineOptions

    cfg, params = model_to_time(args.preset, args.layers, 1024)
    engine = Engine(
        cfg, params, jax.devices()[:1], EngineOptions(request_slots_per_device=args.batch)
    )
    mesh = engine.mesh
    inputs = full_batch_decode_inputs(engine, 64)
    compiled = mesh.programs.compile_decode()
    text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    ops = {name: len(re.findall(rf"\b{name}\(", text)) for name in ("while", "conditional")}
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    print(f"# {cfg.name} x{cfg.num_layers}, batch {args.batch}, {jax.devices()[0].device_kind}")
    print(f"host-synchronising ops: {ops}; custom calls: {dict(targets)}")
    launched = launches(text)
    print(
        f"top-level ops that launch work (about the kernels a step launches): "
        f"{sum(launched.values())} {dict(launched.most_common())}"
    )
    jax.block_until_ready(mesh.decode(*inputs).tokens)
    returned, finished = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        out = mesh.decode(*inputs)
        returned.append(time.perf_counter() - start)
        jax.block_until_ready(out.tokens)
        finished.append(time.perf_counter() - start)
    launched_ms, done_ms = back_to_back(engine, 64, args.steps)
    ms = lambda xs: 1000 * float(np.median(xs))  # noqa: E731
    print(f"call returns after {ms(returned):.2f} ms, result ready after {ms(finished):.2f} ms")
    print(
        f"{args.steps} calls back to back: launched in {launched_ms:.2f} ms per step, done in "
        f"{done_ms:.2f} ms per step"
    )
    return 0


NOT_LAUNCHED = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "copy-start",
    "copy-done",
    "opt-barrier",
}


def launches(text: str) -> collections.Counter:
    """Opcodes of the ENTRY computation's instructions, less the ones that launch nothing."""
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    opcodes = re.findall(r"^\s+(?:ROOT )?\S+ = \S+(?: \S+)*? ([a-z-]+)\(", entry, re.M)
    return collections.Counter(op for op in opcodes if op not in NOT_LAUNCHED)


if __name__ == "__main__":
    sys.exit(main())
