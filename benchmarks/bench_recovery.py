"""Recovery after one device loss: the pause and its breakdown, cold and with standby
executables, and the same recovery as a ratio to a full restart measured in the same run.

  python benchmarks/bench_recovery.py --preset tiny-mixtral --devices 8                  # CPU
  python benchmarks/bench_recovery.py --preset qwen3-30b-a3b --devices 4 --layers 12     # GPU

pause_ms is the coordinator's (plan + move + verify + switch); first_step_ms adds the first
decode step on the new mesh (which re-prefills the lost device's requests). After the standby
recovery the lost device rejoins (experts copied back onto it, every written slot checked
against its expert's checksum on the device: verify_ms), then every slot is checked once
(`mesh verify`). The full restart is a new
process that reads the weights from an orbax checkpoint on disk (written by this run first, to
--checkpoint or a temporary directory; just written, so likely read from the page cache: a
cold disk makes a real restart slower still), deploys them, compiles and serves a first step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import model_to_time, simulate_devices_unless_gpu  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=0)
    p.add_argument("--batch-per-device", type=int, default=4)
    p.add_argument("--redundant-experts", type=int, default=-1, help="-1 = num_experts")
    p.add_argument(
        "--layers-per-program",
        type=int,
        default=0,
        help="EngineOptions.layers_per_program (0: one program per step): what a cold recovery "
        "compiles on its critical path",
    )
    p.add_argument(
        "--checkpoint",
        default="",
        help="directory for the orbax checkpoint the restart reads (default: a temporary one, "
        "removed after the run); must be empty or absent",
    )
    p.add_argument("--restart-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def setup(args):
    simulate_devices_unless_gpu(args.devices)
    import jax

    cfg, params = model_to_time(args.preset, args.layers, args.max_seq_len)
    return jax, cfg, params, jax.devices()[: args.devices]


def engine_for(cfg, params, devices, args):
    from elastic_moe import Engine, EngineOptions

    redundant = cfg.num_experts if args.redundant_experts < 0 else args.redundant_experts
    options = EngineOptions(
        request_slots_per_device=args.batch_per_device,
        redundant_experts=redundant,
        layers_per_program=args.layers_per_program,
    )
    return Engine(cfg, params, devices, options)


def load(engine, cfg, n, seed=0):
    import numpy as np

    from elastic_moe import Request

    rng = np.random.default_rng(seed)
    for _ in range(n):
        prompt = rng.integers(0, cfg.vocab_size, size=24).tolist()
        engine.submit(Request(prompt, max_tokens=64))


def restart(args) -> None:
    """The full-restart path, timed inside a new process (printed as one line): the weights
    from the checkpoint on disk, then deploy, compile and two served steps."""
    start = time.perf_counter()
    simulate_devices_unless_gpu(args.devices)
    import jax

    from elastic_moe.checkpoint import restore_checkpoint

    cfg, params = restore_checkpoint(args.checkpoint)
    read_s = time.perf_counter() - start
    devices = jax.devices()[: args.devices]
    engine = engine_for(cfg, params, devices, args)
    load(engine, cfg, engine.mesh.geometry.num_request_slots)
    engine.step()
    engine.step()
    jax.block_until_ready(engine.mesh.cache)
    print(f"RESTART_S {time.perf_counter() - start:.3f} READ_S {read_s:.3f}")


def recover(args, standby: bool) -> dict:
    from elastic_moe.coordinator import Coordinator

    jax, cfg, params, devices = CONTEXT
    t0 = time.perf_counter()
    engine = engine_for(cfg, params, devices, args)
    print(f"#   engine deployed in {time.perf_counter() - t0:.1f} s", flush=True)
    coordinator = Coordinator(engine, standby=False)
    load(engine, cfg, engine.mesh.geometry.num_request_slots)
    for _ in range(3):
        engine.step()
    if standby:
        engine.prefill_lengths_seen.update({32})  # the workload's prompts and re-prefills
        coordinator.warm_standby()
        engine.executables.wait_standby()
        print(f"#   standby compiled by {time.perf_counter() - t0:.1f} s", flush=True)
    lost = devices[len(devices) // 2].id
    start = time.perf_counter()
    result = coordinator.fail([lost])
    engine.step()
    jax.block_until_ready(engine.mesh.cache)
    first_step_ms = 1000 * (time.perf_counter() - start)
    extra = {}
    if standby:
        rejoined = coordinator.rejoin([lost])
        engine.step()
        verified = coordinator.verify(repair=False)  # compiled by the rejoin: timed warm
        verified = coordinator.verify(repair=False)
        extra = {
            "rejoin": rejoined,
            "all_slots": verified.slots_checked,
            "all_verify_ms": verified.verify_ms,
            "wrong": len(verified.mismatches),
        }
    engine.executables.shutdown()
    return dict(result.__dict__, first_step_ms=first_step_ms, **extra)


CONTEXT = None


def main() -> int:
    global CONTEXT
    args = parse()
    if args.restart_only:
        restart(args)
        return 0
    CONTEXT = setup(args)
    _, cfg, _, devices = CONTEXT
    print(f"# {cfg.name} x{cfg.num_layers} layers on {len(devices)} x {devices[0].device_kind}")
    keys = ["pause_ms", "first_step_ms", "plan_ms", "transfer_ms", "compile_ms"]
    keys += ["experts_copied", "requests_reprefilled"]
    print(f"{'recovery':20s} " + " ".join(f"{k:>20s}" for k in keys), flush=True)
    rows = []
    for name, standby in (("cold (no standby)", False), ("standby", True)):
        row = recover(args, standby)
        rows.append((name, row))
        print(f"{name:20s} " + " ".join(f"{row[k]:20.1f}" for k in keys), flush=True)
        if "rejoin" in row:
            r = row["rejoin"]
            print(
                f"{'  then rejoin':20s} pause {r.pause_ms:.1f} ms, transfer {r.transfer_ms:.1f}"
                f" ms, compile {r.compile_ms:.1f} ms, {r.experts_copied} copied + "
                f"{r.experts_restored_from_host} from host, {r.slots_verified} slots checked in "
                f"{r.verify_ms:.1f} ms, {r.slots_repaired} rewritten",
                flush=True,
            )
            print(
                f"{'  mesh verify':20s} all {row['all_slots']} slots checked in "
                f"{row['all_verify_ms']:.1f} ms, {row['wrong']} wrong",
                flush=True,
            )
    wall, inner, read = restart_in_new_process(args, cfg, CONTEXT[2])
    restart_ms = 1000 * wall
    for name, row in rows:
        ratio = restart_ms / row["first_step_ms"]
        print(f"full restart / {name} recovery (to first step): {ratio:.1f}x")
    print(
        f"full restart: {restart_ms:.0f} ms wall (process start to first served step; "
        f"{1000 * inner:.0f} ms inside the process, of which {1000 * read:.0f} ms reading the "
        "checkpoint)"
    )
    return 0


def restart_in_new_process(args, cfg, params) -> tuple[float, float, float]:
    """(wall s, s inside the child, s of those reading the weights) of a full restart that reads
    an orbax checkpoint this process writes first."""
    from elastic_moe.checkpoint import save_checkpoint

    scratch = None if args.checkpoint else tempfile.mkdtemp(prefix="bench_recovery_")
    directory = args.checkpoint or os.path.join(scratch, "model")
    try:
        start = time.perf_counter()
        save_checkpoint(directory, cfg, params)
        print(f"# checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)
        # the last --checkpoint wins in the child's argparse
        command = [sys.executable, os.path.abspath(__file__), "--restart-only", *sys.argv[1:]]
        command += ["--checkpoint", directory]
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
        wall = time.perf_counter() - started
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    line = next(line.split() for line in out.stdout.splitlines() if line.startswith("RESTART_S"))
    return wall, float(line[1]), float(line[3])


if __name__ == "__main__":
    sys.exit(main())
