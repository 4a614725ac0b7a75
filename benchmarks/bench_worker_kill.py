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

  PYTHONPATH=. python benchmarks/bench_worker_kill.py --grpc --workers 2                 # GPU
  PYTHONPATH=. python benchmarks/bench_worker_kill.py --grpc --workers 2 --cpu-devices 1 # CPU

--grpc goes through the server instead: it starts `elastic-moe serve --workers N` (the frontend,
its runtime loop and the gRPC services), streams the load through serve.client, SIGKILLs one
worker mid-stream, and prints, from the client's side (token arrival times) and the server's log:
  detect_ms         kill -> the survivors' ProcessFailureError (eof_ms: the channel's close)
  pause_ms          the last token of any stream on the old mesh -> the first on the new one
  first_token_ms    kill -> the first token on the new mesh
  lost, equal       streams that did not finish; outputs equal to the failure-free round
  tok/s before / after, from the streams' arrival times
then asks `mesh rejoin` for the dead worker's devices and prints what happened (rejoin_ms, or the
error) and, when it rejoined, whether a third round is unchanged.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
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
    p.add_argument("--grpc", action="store_true", help="through `elastic-moe serve --workers`")
    p.add_argument("--no-rejoin", action="store_true", help="--grpc: skip the rejoin")
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


# ---- --grpc: through `elastic-moe serve --workers N` ----------------------------------------
SERVING = re.compile(r"serving generation on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")
SEEN_AT = re.compile(r"channel closed (\S+), survivors' failure (\{.*\})")


def worker_pid(serve_pid: int, process_id: int) -> int:
    """The pid of worker `process_id` among the serve process's children (Linux /proc)."""
    for task in os.listdir(f"/proc/{serve_pid}/task"):
        with open(f"/proc/{serve_pid}/task/{task}/children") as f:
            children = [int(c) for c in f.read().split()]
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"elastic_moe.worker" in argv and f"--process-id={process_id}".encode() in argv:
                return child
    raise LookupError(f"no worker {process_id} under process {serve_pid}")


def stream_round(client, args, vocab: int, on_progress=None) -> list[dict]:
    """Streams the load at once; each stream's tokens, epochs and arrival times (time.time()).
    on_progress(streams) runs in this thread each time a stream gets a token, until it returns
    True."""
    import queue
    import threading

    streams = []
    for i in range(args.requests):
        prompt = [(7 * i + 3 * j + 1) % vocab for j in range(3 + i % 5)]
        sampling = {} if i % 2 == 0 else {"temperature": 0.8, "seed": i}
        streams.append(
            {
                "prompt": prompt,
                "sampling": sampling,
                "tokens": [],
                "epochs": [],
                "times": [],
                "finish": "",
                "error": None,
            }
        )
    ticks: queue.Queue = queue.Queue()

    def run(s) -> None:
        try:
            for response in client.generate_stream(s["prompt"], args.max_tokens, **s["sampling"]):
                if response.HasField("chunk"):
                    now = time.time()
                    for token in response.chunk.token_ids:
                        s["tokens"].append(token)
                        s["epochs"].append(response.chunk.mesh_epoch)
                        s["times"].append(now)
                    ticks.put(1)
                elif response.HasField("complete"):
                    s["finish"] = response.complete.finish_reason
        except Exception as error:  # counted as lost
            s["error"] = str(error)[:300]
        ticks.put(None)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    ended, watching = 0, on_progress is not None
    while ended < len(streams):
        if ticks.get() is None:
            ended += 1
        if watching and on_progress(streams):
            watching = False
    for t in threads:
        t.join()
    return streams


def arrival_rate(streams, start: float, end: float) -> float:
    n = sum(start <= t <= end for s in streams for t in s["times"])
    return n / (end - start) if end > start else float("nan")


def trial_grpc(args, kill: int, platform: str, standby: bool) -> dict:
    import subprocess
    import threading

    from models.presets import get_preset
    from serve.client import Client
    from serve.proto import elastic_moe_pb2 as pb

    vocab = get_preset(args.preset).vocab_size
    command = [sys.executable, "-m", "elastic_moe", "serve", "--preset", args.preset]
    command += ["--workers", str(args.workers), "--worker-platform", platform]
    if platform == "cpu":
        command += ["--devices", str(args.workers * args.cpu_devices)]
    command += ["--port", "0", "--admin-port", "0", "--drain-timeout", "5"]
    command += ["--heartbeat-timeout", str(args.heartbeat)]
    command += ["--collective-timeout", str(args.collective_timeout)]
    command += ["--step-timeout", str(args.step_timeout)]
    if not standby:
        command.append("--no-standby")
    if args.log_dir:
        command += ["--worker-logs", args.log_dir]
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)  # serve --workers keeps its own on the CPU
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root
    )
    log: list[str] = []
    threading.Thread(target=lambda: [log.append(x) for x in server.stderr], daemon=True).start()
    result: dict = {"kill": kill, "standby": standby, "grpc": True}
    try:
        first = server.stdout.readline()
        found = SERVING.search(first)
        if not found:
            server.wait(timeout=30)
            say("".join(log[-40:]))
            raise RuntimeError(f"serve did not start: {first!r}")
        port, admin = found.groups()
        say(
            f"[kill {kill}] serve --workers {args.workers} up in "
            f"{time.perf_counter() - t0:.1f} s (start, deploy, compiles)"
        )
        with Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin}", timeout=600) as c:
            status = c.mesh_status()
            lost_ids = [d.id for d in status.devices if d.process_index == kill]
            clean = stream_round(c, args, vocab)
            t_clean = [t for s in clean for t in s["times"]]
            say(
                f"[kill {kill}] failure-free: {len(clean)} streams, "
                f"{arrival_rate(clean, min(t_clean), max(t_clean)):.0f} tok/s"
            )
            victim = worker_pid(server.pid, kill)
            killed_at: list[float] = []

            def kill_when_streaming(streams) -> bool:
                if min(len(s["tokens"]) for s in streams) < args.kill_after_steps:
                    return False
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.time())
                return True

            served = stream_round(c, args, vocab, kill_when_streaming)
            k = killed_at[0]
            new = [t for s in served for t, e in zip(s["times"], s["epochs"], strict=True) if e > 0]
            old = [
                t for s in served for t, e in zip(s["times"], s["epochs"], strict=True) if e == 0
            ]
            first_new = min(new) if new else float("nan")
            seen = [SEEN_AT.search(x) for x in log]
            seen = [m for m in seen if m]
            if seen:
                eof, survivors = seen[-1].group(1), ast.literal_eval(seen[-1].group(2))
                result["eof_ms"] = None if eof == "none" else round(1000 * (float(eof) - k), 1)
                result["detect_ms"] = {i: round(1000 * (t - k), 1) for i, t in survivors.items()}
            result["pause_ms"] = round(1000 * (first_new - max(old)), 1) if old else None
            result["first_token_ms"] = round(1000 * (first_new - k), 1)
            result["lost"] = sum(s["error"] is not None or s["finish"] != pb.LENGTH for s in served)
            pairs = list(zip(clean, served, strict=True))
            result["equal_greedy"] = all(
                a["tokens"] == b["tokens"] for a, b in pairs if not a["sampling"]
            )
            result["equal_seeded"] = all(
                a["tokens"] == b["tokens"] for a, b in pairs if a["sampling"]
            )
            result["reprefilled"] = sum(len(set(s["epochs"])) > 1 for s in served)
            result["tok_s_before"] = round(arrival_rate(served, min(old), k), 0) if old else None
            end = max(t for s in served for t in s["times"])
            result["tok_s_after"] = round(arrival_rate(served, first_new, end), 0)
            compiles = [x.split(": ", 1)[-1].strip() for x in log if "compiled in every" in x]
            result["compiles_while_serving"] = compiles
            status = c.mesh_status()
            result["failed_devices"] = [d.id for d in status.devices if d.state == pb.FAILED]
            result["server_pause_ms"] = round(status.last.pause_ms, 1)
            say(
                f"[kill {kill}] "
                + "  ".join(
                    f"{n} {result.get(n)}"
                    for n in (
                        "eof_ms",
                        "detect_ms",
                        "pause_ms",
                        "first_token_ms",
                        "lost",
                        "equal_greedy",
                        "equal_seeded",
                        "reprefilled",
                        "tok_s_before",
                        "tok_s_after",
                        "failed_devices",
                        "server_pause_ms",
                        "compiles_while_serving",
                    )
                )
            )
            if not args.no_rejoin:
                t_rejoin = time.perf_counter()
                try:
                    reply = c.rejoin(lost_ids)
                    result["rejoin_ms"] = round(1000 * (time.perf_counter() - t_rejoin), 0)
                    result["rejoin_epoch"] = reply.summary.to_epoch
                    result["rejoin_pause_ms"] = round(reply.summary.pause_ms, 0)
                    again = stream_round(c, args, vocab)
                    result["rejoin_equal"] = all(
                        a["tokens"] == b["tokens"] for a, b in zip(clean, again, strict=True)
                    )
                    result["rejoin_lost"] = sum(s["finish"] != pb.LENGTH for s in again)
                except Exception as error:
                    details = error.details() if hasattr(error, "details") else str(error)
                    result["rejoin_ms"] = round(1000 * (time.perf_counter() - t_rejoin), 0)
                    result["rejoin_error"] = details[:400]
                    after = stream_round(c, args, vocab)
                    result["after_failed_rejoin_equal"] = all(
                        a["tokens"] == b["tokens"] for a, b in zip(clean, after, strict=True)
                    )
                say(
                    f"[kill {kill}] rejoin: "
                    + "  ".join(
                        f"{n} {result[n]}" for n in result if n.startswith(("rejoin", "after_"))
                    )
                )
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    args = parse()
    platform = "cpu" if args.cpu_devices or not has_gpu() else "gpu"
    if platform == "cpu" and not args.cpu_devices:
        args.cpu_devices = 1
    if args.grpc:
        results = []
        kills = [int(k) for k in args.kill.split(",")]
        standbys = [True] * len(kills)
        if args.standby is not None:
            standbys = [s == "1" for s in args.standby.split(",")]
        say(
            f"platform {platform}, {args.workers} workers through gRPC, preset {args.preset}, "
            f"heartbeat {args.heartbeat} s"
        )
        for kill, standby in zip(kills, standbys, strict=True):
            results.append(trial_grpc(args, kill, platform, standby))
        say("summary", results)
        return
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
