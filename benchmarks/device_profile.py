"""Where a compiled step's device time goes, by `jax.named_scope`, from a `jax.profiler` trace.

  os.environ["XLA_FLAGS"] += " " + dump_flags(dump_dir)  # before jax is imported
  with traced(trace_dir):
      ...run steps...
  print_summary(trace_dir, dump_dir, steps=20)

The trace's device planes list each kernel with the HLO op (and module) it ran, but not the
named scopes; those are in the ops' metadata, read from the optimized HLO that XLA dumps
(`dump_flags(directory)` must be in XLA_FLAGS before jax is imported). A fusion counts under the
first scope of SCOPES that any of its fused ops carries. Parsing uses `jax.profiler.ProfileData`
(no xprof or TensorBoard needed).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections import defaultdict

# The first of these found in an op's scope path names its bucket (innermost scopes first).
SCOPES = (
    "grouped_matmul",
    "combine_invariant",
    "combine_fast",
    "dispatch",
    "routing",
    "shared_expert",
    "attention",
    "lm_head",
    "sampling",
    "norm",
)


def dump_flags(directory: str) -> str:
    """XLA_FLAGS that dump each module's optimized HLO (with op metadata) into `directory`,
    with CUDA graphs off: inside a graph the trace names the graph, not the kernel's op, so
    the profile shows kernel times but not the launch savings of graphs."""
    return (
        f"--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$ "
        "--xla_gpu_enable_command_buffer="
    )


_MODULE = re.compile(r"^HloModule (\S+?),")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(\S+) \(")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?(\S+) = .*")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _scope_of(text: str) -> str | None:
    for scope in SCOPES:
        if f"/{scope}/" in text or text.endswith(f"/{scope}"):
            return scope
    return None


def scopes_from_hlo_dump(directory: str) -> dict[tuple[str, str], str]:
    """{(module, instruction): scope} for every optimized module dumped under `directory`."""
    found: dict[tuple[str, str], str] = {}
    for path in glob.glob(os.path.join(directory, "*after_optimizations.txt")):
        module, computation = "", ""
        per_computation: dict[str, list[str]] = defaultdict(list)
        calls: dict[str, str] = {}
        own: dict[str, str] = {}
        with open(path) as f:
            for line in f:
                if m := _MODULE.match(line):
                    module = m.group(1)
                elif m := _COMPUTATION.match(line):
                    computation = m.group(1)
                elif m := _INSTRUCTION.match(line):
                    name = m.group(1)
                    if op := _OP_NAME.search(line):
                        if scope := _scope_of(op.group(1)):
                            own[name] = scope
                            per_computation[computation].append(scope)
                    if c := _CALLS.search(line):
                        calls[name] = c.group(1)
        for name, callee in calls.items():
            inner = per_computation.get(callee)
            if name not in own and inner:
                own[name] = min(inner, key=SCOPES.index)
        for name, scope in own.items():
            found[(module, name)] = scope
            found[("", name)] = scope  # for traces whose module names differ from the dump's
    return found


@contextlib.contextmanager
def traced(directory: str):
    import jax

    jax.profiler.start_trace(directory)
    try:
        yield
    finally:
        jax.profiler.stop_trace()


def _stats(event) -> dict[str, str]:
    found = {}
    for name, value in event.stats:
        found[name] = str(value)
    return found


def _bucket(stats: dict[str, str], scopes: dict[tuple[str, str], str]) -> str:
    op, module = stats.get("hlo_op", ""), stats.get("hlo_module", "")
    return scopes.get((module, op)) or scopes.get(("", op)) or _scope_of("/" + op + "/") or "other"


def summarize(
    directory: str, scopes: dict[tuple[str, str], str]
) -> tuple[dict[str, float], dict[str, float], int, dict[str, int]]:
    """(ms per scope, ms per kernel name, number of device planes, kernels per scope) summed
    over the trace."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb under {directory}")
    by_scope: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    planes = 0
    data = ProfileData.from_file(paths[-1])
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in devices or [p for p in data.planes if p.name == "/host:CPU"]:
        planes += 1
        for line in plane.lines:
            # GPU planes have one line of kernels per stream plus "XLA Modules"/"XLA Ops"
            # summaries; kernels are counted once, from the stream lines.
            if devices and not line.name.startswith("Stream"):
                continue
            for event in line.events:
                stats = _stats(event)
                if "hlo_op" not in stats:
                    continue
                ms = event.duration_ns / 1e6
                bucket = _bucket(stats, scopes)
                by_scope[bucket] += ms
                launches[bucket] += 1
                by_kernel[f"{event.name[:48]} [{stats.get('hlo_op', '?')[:24]}]"] += ms
    return dict(by_scope), dict(by_kernel), planes, dict(launches)


def print_summary(trace_dir: str, dump_dir: str, steps: int, top: int = 15) -> None:
    scopes = scopes_from_hlo_dump(dump_dir)
    by_scope, by_kernel, planes, launches = summarize(trace_dir, scopes)
    per = max(1, steps * max(1, planes))
    total = sum(by_scope.values()) / per
    modules = len(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")))
    print(
        f"# device time per step and device, by named scope ({planes} device planes, "
        f"{modules} optimized modules dumped, {len(scopes) // 2} scoped ops):"
    )
    for scope, ms in sorted(by_scope.items(), key=lambda kv: -kv[1]):
        share = 100 * ms / per / max(total, 1e-9)
        print(
            f"  {scope:20s} {ms / per:8.3f} ms  {share:5.1f}%  {launches[scope] / per:6.1f} kernels"
        )
    kernels = sum(launches.values()) / per
    print(f"  {'total (kernels)':20s} {total:8.3f} ms         {kernels:6.1f} kernels")
    print(f"# top {top} kernels per step and device:")
    for name, ms in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms / per:8.3f} ms  {name}")
