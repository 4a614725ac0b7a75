"""A worker process killed with kill -9 while serving: detection, recovery and the outputs.

  PYTHONPATH=. python benchmarks/bench_worker_kill.py --workers 2                 # GPU: 1 each
  PYTHONPATH=. python benchmarks/bench_worker_kill.py --workers 2 --cpu-devices 2 # CPU (gloo)

This process is the frontend: it owns no accelerator (JAX_PLATFORMS=cpu here, no backend is
started), hosts the coordination service and keeps every request. It starts one worker per GPU,
serves a batch of greedy and seeded-sampling requests failure-free (the oracle), serves it again
and SIGKILLs one worker mid-stream, then prints, each line as soon as it is known:
  eof_ms            kill -> the frontend sees the worker's channel close
  detect_ms         kill -> the survivor's step raises ProcessFailureError (live_devices)
  failed_step_ms    kill -> the failed step's replies are all in at the frontend
  redeploy_ms       the survivors deploy the model again over their own devices (from their host
                    copies), compiling there unless the trial had standby compiles (--standby)
  first_token_ms    kill -> the first token on the new mesh (every request in flight re-prefilled)
  lost, equal       requests lost (must be 0); outputs equal to the failure-free run
  tok/s before / after, from the decode steps' times
One trial per --kill entry (with the --standby entry of the same place), each on a fresh
cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import has_gpu  # noqa: E402

# The frontend owns no accelerator: keep its JAX (imported by the engine code) on the CPU.
os.environ["JAX_PLATFORMS"] = "cpu"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpu-devices", type=int, default=0, help="CPU: simulated devices per worker")
    p.add_argument("--kill", default="1,0", help="the worker killed in each trial, in order")
    p.add_argument("--heartbeat", type=int, default=1, help="heartbeat timeout (s)")
    p.add_argument("--collective-timeout", type=int, default=5, help="CPU only (s)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--kill-after-steps", type=int, default=8)
    p.add_argument("--step-timeout", type=float, default=30.0)
    p.add_argument("--log-dir", default=None, help="worker logs go here")
    p.add_argument(
        "--standby",
        default=None,
        help="per trial, 1: the workers compile the survivor meshes' programs ahead (default: 1"
        " for every trial)",
    )
    return p.parse_args()


def say(*parts) -> None:
    print(*parts, flush=True)


def requests_for(args, vocab: int):
    from elastic_moe.requests import Request, SamplingParams

    out = []
    for i in range(args.requests):
        prompt = [(7 * i + 3 * j + 1) % vocab for j in range(3 + i % 5)]
        sampling = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.8, seed=i)
        out.append(Request(prompt, max_tokens=args.max_tokens, sampling=sampling))
    return out


def serve_steps(engine, timings: list[tuple[float, int]]) -> None:
    """One engine step, with (seconds, tokens made) appended to `timings`."""
    started = time.perf_counter()
    events = engine.step()
    timings.append((time.perf_counter() - started, len(events)))


def rate(timings: list[tuple[float, int]]) -> float:
    seconds = sum(t for t, _ in timings)
    return sum(n for _, n in timings) / seconds if seconds else float("nan")


def trial(args, kill: int, platform: str, standby: bool) -> dict:
    from elastic_moe.distributed_service import ClusterOptions
    from elastic_moe.engine import EngineOptions
    from elastic_moe.frontend_engine import frontend_engine, recover_on_survivors
    from elastic_moe.remote_mesh import RemoteMesh
    from elastic_moe.worker_pool import WorkerFailure, WorkerPool
    from models.presets import get_preset

    cfg = get_preset(args.preset)
    options = EngineOptions()
    as_dict = dataclasses.asdict(options)
    cluster = ClusterOptions(
        heartbeat_timeout_s=args.heartbeat, collective_timeout_s=args.collective_timeout
    )
    t0 = time.perf_counter()
    pool = WorkerPool(
        args.workers,
        platform=platform,
        cpu_devices_per_worker=max(1, args.cpu_devices),
        options=cluster,
        log_dir=args.log_dir,
    )
    try:
        say(
            f"[kill {kill}] pool up: {1000 * (time.perf_counter() - t0):.0f} ms, devices",
            {w.process_id: w.device_ids for w in pool.workers},
        )
        t1 = time.perf_counter()
        mesh = RemoteMesh.deploy(pool, args.preset, as_dict, prefill_lengths=[16])
        mesh.step_timeout_s = args.step_timeout
        say(
            f"[kill {kill}] deploy: {1000 * (time.perf_counter() - t1):.0f} ms over",
            mesh.device_ids,
            "geometry",
            mesh.geometry,
        )
        if standby:
            t_standby = time.perf_counter()
            replies = mesh.standby([16])
            say(
                f"[kill {kill}] standby compiles: {1000 * (time.perf_counter() - t_standby):.0f}"
                f" ms, meshes {[r['meshes'] for r in replies]}"
            )
        engine = frontend_engine(cfg, mesh, options)

        oracle = requests_for(args, cfg.vocab_size)
        for r in oracle:
            engine.submit(r)
        clean: list[tuple[float, int]] = []
        while any(not r.done for r in oracle):
            serve_steps(engine, clean)
        say(
            f"[kill {kill}] failure-free: {len(oracle)} requests, {rate(clean[1:]):.0f} tok/s "
            f"(worker step ms {[round(x, 2) for x in mesh.last_step_ms]})"
        )

        served = requests_for(args, cfg.vocab_size)
        for r in served:
            engine.submit(r)
        before: list[tuple[float, int]] = []
        for _ in range(args.kill_after_steps):
            serve_steps(engine, before)
        victim = pool.workers[kill]
        killed_at = time.time()
        os.kill(victim.process.pid, signal.SIGKILL)
        try:
            engine.step()
            say(f"[kill {kill}] NO FAILURE SEEN in the step after the kill")
            failure = None
        except WorkerFailure as e:
            failure = e
        failed_at = time.time()
        result: dict = {"kill": kill, "standby": standby}
        if failure is not None:
            result["eof_ms"] = (
                None if failure.eof_at is None else 1000 * (failure.eof_at - killed_at)
            )
            result["detect_ms"] = {
                i: round(1000 * (t - killed_at), 1) for i, t in failure.survivor_detected_at.items()
            }
            result["failed_step_ms"] = 1000 * (failed_at - killed_at)
            say(f"[kill {kill}] {failure}")
            say(
                f"[kill {kill}] eof_ms {result['eof_ms']}  detect_ms {result['detect_ms']}  "
                f"failed_step_ms {result['failed_step_ms']:.1f}"
            )
        t2 = time.perf_counter()
        requeued = recover_on_survivors(engine, args.preset, as_dict)
        result["redeploy_ms"] = 1000 * (time.perf_counter() - t2)
        engine.mesh.step_timeout_s = args.step_timeout
        say(
            f"[kill {kill}] redeploy_ms {result['redeploy_ms']:.0f} over {engine.mesh.device_ids}, "
            f"{requeued} requests re-prefilled"
        )
        after: list[tuple[float, int]] = []
        serve_steps(engine, after)
        result["first_token_ms"] = 1000 * (time.time() - killed_at)
        say(
            f"[kill {kill}] first_token_ms {result['first_token_ms']:.0f} (kill to the first "
            "token on the new mesh)"
        )
        while any(not r.done for r in served):
            serve_steps(engine, after)
        lost = sum(r.finish_reason is None or r.error is not None for r in served)
        equal_greedy = all(
            a.generated == b.generated
            for a, b in zip(oracle, served, strict=True)
            if a.sampling.temperature == 0
        )
        equal_sampled = all(
            a.generated == b.generated
            for a, b in zip(oracle, served, strict=True)
            if a.sampling.temperature > 0
        )
        result.update(
            lost=lost,
            equal_greedy=equal_greedy,
            equal_sampled=equal_sampled,
            tok_s_before=rate(before[1:]),
            tok_s_after=rate(after[1:]),
            worker_step_ms_after=engine.mesh.last_step_ms,
        )
        say(
            f"[kill {kill}] lost {lost}  equal greedy {equal_greedy}  equal seeded {equal_sampled}"
            f"  tok/s before {result['tok_s_before']:.0f} after {result['tok_s_after']:.0f}"
        )
        return result
    finally:
        pool.close()


def main() -> None:
    args = parse()
    platform = "cpu" if args.cpu_devices or not has_gpu() else "gpu"
    if platform == "cpu" and not args.cpu_devices:
        args.cpu_devices = 1
    import jax

    say(
        f"jax {jax.__version__}, platform {platform}, {args.workers} workers, preset "
        f"{args.preset}, heartbeat {args.heartbeat} s"
    )
    results = []
    kills = [int(k) for k in args.kill.split(",")]
    standbys = [True] * len(kills)
    if args.standby is not None:
        standbys = [s == "1" for s in args.standby.split(",")]
    for kill, standby in zip(kills, standbys, strict=True):
        results.append(trial(args, kill, platform, standby))
    say("summary", results)


if __name__ == "__main__":
    main()
