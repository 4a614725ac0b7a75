"""Serving under load through a device failure: latency, throughput and goodput, by phase.

    python -m benchmarks.bench_serving --local --rate 8 --duration 20 --fail-at 6 3 --rejoin-at 13
    python -m benchmarks.bench_serving --server 10.0.0.7:50051 --admin-token "$TOKEN" ...

A load generator in the manner of JetStream's and vLLM's benchmark_serving: requests arrive as a
Poisson process (--rate per second; inf = all at once) with random prompts (--prompt-len) and
stream their tokens (--max-tokens, all generated: no stop tokens). At --fail-at SECONDS DEVICE
the Admin API declares DEVICE failed, at --rejoin-at SECONDS it rejoins. Results are reported
for three phases: before the failure, during the failure window ([fail-at, rejoin-at), or to the
end without a rejoin) and after the rejoin. TTFT and goodput belong to the phase in which a
request arrived; inter-token latency and throughput to the phase in which the token arrived.
Goodput counts requests that meet both SLOs: TTFT <= --slo-ttft-ms and mean time per output
token (TPOT, as vLLM defines it) <= --slo-tpot-ms.

--local starts its own server in this process, on simulated CPU devices (tiny-mixtral by
default): client, server and engine then share the host's cores, so absolute numbers measure
the whole stack on this machine, not a GPU deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field

PHASES = ("before", "during", "after")


@dataclass
class Sample:
    """One request as the client saw it (times in seconds from the start of the run)."""

    arrival: float
    prompt_len: int
    first_token: float | None = None
    tokens: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, count)
    done: float | None = None
    error: str | None = None
    reprefills: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.tokens)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = self.output_tokens
        if self.done is None or self.first_token is None or n < 2:
            return None
        return (self.done - self.first_token) / (n - 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def phase_of(t: float, fail_at: float | None, window_end: float | None) -> str:
    if fail_at is None or t < fail_at:
        return "before"
    if window_end is None or t < window_end:
        return "during"
    return "after"


def summarize(samples: list[Sample], args, end: float) -> dict[str, dict]:
    fail_at = args.fail_at[0] if args.fail_at else None
    window_end = args.rejoin_at
    bounds = {
        "before": (0.0, fail_at if fail_at is not None else end),
        "during": (fail_at, window_end if window_end is not None else end),
        "after": (window_end, end),
    }
    report = {}
    for phase in PHASES:
        start, stop = bounds[phase]
        if start is None or stop is None or stop <= start:
            continue
        arrived = [s for s in samples if phase_of(s.arrival, fail_at, window_end) == phase]
        ok = [s for s in arrived if s.error is None and s.done is not None]
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        itls, tokens = [], 0
        for s in samples:
            for (t0, _), (t1, _) in zip(s.tokens, s.tokens[1:], strict=False):
                if phase_of(t1, fail_at, window_end) == phase:
                    itls.append(t1 - t0)
            tokens += sum(n for t, n in s.tokens if phase_of(t, fail_at, window_end) == phase)
        good = [
            s
            for s in ok
            if s.ttft is not None
            and s.ttft * 1000 <= args.slo_ttft_ms
            and (s.tpot is None or s.tpot * 1000 <= args.slo_tpot_ms)
        ]
        span = stop - start
        report[phase] = {
            "window_s": [round(start, 2), round(stop, 2)],
            "requests": len(arrived),
            "completed": len(ok),
            "errors": len(arrived) - len(ok),
            "reprefilled": sum(s.reprefills > 0 for s in ok),
            "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "itl_p50_ms": 1000 * percentile(itls, 50),
            "itl_p99_ms": 1000 * percentile(itls, 99),
            "itl_max_ms": 1000 * max(itls, default=math.nan),
            "throughput_tok_s": tokens / span,
            "goodput_req_s": len(good) / span,
            "goodput_pct": 100 * len(good) / len(arrived) if arrived else math.nan,
        }
    return report


def print_table(report: dict[str, dict], events: list[dict], args, header: str) -> None:
    print(header)
    rows = [
        ("window (s)", lambda r: f"{r['window_s'][0]:.1f}-{r['window_s'][1]:.1f}"),
        ("requests (arrived)", lambda r: f"{r['requests']}"),
        ("completed / errors", lambda r: f"{r['completed']} / {r['errors']}"),
        ("re-prefilled requests", lambda r: f"{r['reprefilled']}"),
        ("TTFT p50 (ms)", lambda r: f"{r['ttft_p50_ms']:.1f}"),
        ("TTFT p99 (ms)", lambda r: f"{r['ttft_p99_ms']:.1f}"),
        ("ITL p50 (ms)", lambda r: f"{r['itl_p50_ms']:.1f}"),
        ("ITL p99 (ms)", lambda r: f"{r['itl_p99_ms']:.1f}"),
        ("ITL max (ms)", lambda r: f"{r['itl_max_ms']:.1f}"),
        ("throughput (tok/s)", lambda r: f"{r['throughput_tok_s']:.1f}"),
        ("goodput (req/s)", lambda r: f"{r['goodput_req_s']:.2f}"),
        ("goodput (% of requests)", lambda r: f"{r['goodput_pct']:.1f}"),
    ]
    phases = [p for p in PHASES if p in report]
    width = 24
    print(f"| {'':{width}} | " + " | ".join(f"{p:>10}" for p in phases) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 12 for _ in phases) + "|")
    for name, fmt in rows:
        cells = " | ".join(f"{fmt(report[p]):>10}" for p in phases)
        print(f"| {name:{width}} | {cells} |")
    print(f"SLO: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms")
    for event in events:
        print(
            f"at {event['at_s']:.2f} s: {event['what']} -> epoch {event['epoch']}: "
            + ", ".join(
                f"{k} {event[k]:.1f}" if isinstance(event[k], float) else f"{k} {event[k]}"
                for k in (
                    "pause_ms",
                    "transfer_ms",
                    "compile_ms",
                    "experts_copied",
                    "experts_restored_from_host",
                    "requests_reprefilled",
                    "standby_hit",
                )
            )
        )


# ---- the load ---------------------------------------------------------------------------
async def run_load(args, target: str, admin_target: str, vocab_size: int):
    from serve.client import AsyncClient

    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    arrivals, t = [], 0.0
    while len(arrivals) < args.num_requests:
        if not math.isinf(args.rate):
            t += rng.expovariate(args.rate)
        if args.duration is not None and t >= args.duration:
            break
        arrivals.append(t)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(lo, hi))] for _ in arrivals]
    samples = [Sample(a, len(p)) for a, p in zip(arrivals, prompts, strict=True)]
    events: list[dict] = []

    async with AsyncClient(
        target, admin_target=admin_target, admin_token=args.admin_token, timeout=args.timeout
    ) as client:
        start = time.monotonic()

        def now() -> float:
            return time.monotonic() - start

        async def one(sample: Sample, prompt: list[int]) -> None:
            await asyncio.sleep(max(0.0, sample.arrival - now()))
            sample.arrival = now()
            try:
                async for response in client.generate_stream(prompt, args.max_tokens):
                    t = now()
                    if response.HasField("chunk"):
                        if sample.first_token is None:
                            sample.first_token = t
                        sample.tokens.append((t, len(response.chunk.token_ids)))
                    else:
                        sample.done = t
                        sample.reprefills = response.complete.reprefills
            except Exception as error:  # an RpcError: counted, reported by phase
                sample.error = f"{type(error).__name__}: {error}"

        async def operation(at: float, what: str, call) -> None:
            await asyncio.sleep(max(0.0, at - now()))
            began = now()
            result = await call()
            s = result.summary
            events.append(
                {
                    "at_s": began,
                    "what": what,
                    "epoch": result.epoch,
                    "pause_ms": s.pause_ms,
                    "transfer_ms": s.transfer_ms,
                    "compile_ms": s.compile_ms,
                    "experts_copied": s.experts_copied,
                    "experts_restored_from_host": s.experts_restored_from_host,
                    "requests_reprefilled": s.requests_reprefilled,
                    "standby_hit": s.standby_hit,
                }
            )

        tasks = [asyncio.create_task(one(s, p)) for s, p in zip(samples, prompts, strict=True)]
        if args.fail_at:
            at, device = args.fail_at
            tasks.append(
                asyncio.create_task(
                    operation(at, f"fail [{device}]", lambda: client.fail([device], reason="bench"))
                )
            )
            if args.rejoin_at is not None:
                tasks.append(
                    asyncio.create_task(
                        operation(
                            args.rejoin_at, f"rejoin [{device}]", lambda: client.rejoin([device])
                        )
                    )
                )
        await asyncio.gather(*tasks)
        end = now()
    return samples, events, end


# ---- an in-process server on simulated devices ------------------------------------------
def start_local_server(args):
    """(server thread, runtime, vocab size): tiny model, all programs compiled before the load."""
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from elastic_moe import Engine, EngineOptions, get_preset, init_params
    from elastic_moe.coordinator import Coordinator
    from elastic_moe.executables import enable_persistent_cache
    from elastic_moe.runtime import Runtime
    from serve.server import ServerConfig, ServerThread

    enable_persistent_cache()  # a second run skips the XLA compiles of the first
    cfg = get_preset(args.preset)
    devices = jax.devices()[: args.devices]
    redundant = cfg.num_experts if args.redundant_experts is None else args.redundant_experts
    engine = Engine(
        cfg,
        init_params(cfg),
        devices,
        EngineOptions(request_slots_per_device=args.slots_per_device, redundant_experts=redundant),
    )
    # Compile prefill for every length a request (or a re-prefill) can need, then the standby
    # programs of every single-failure mesh, so that no compile lands in the measurement.
    longest = args.prompt_len[1] + args.max_tokens
    length = 8
    while length < 2 * longest:
        engine.generate([[1] * min(length, cfg.max_seq_len - 1)], 1)
        length *= 2
    began = time.perf_counter()
    # The expert transfer programs of the full mesh too: a rejoin moves experts back onto it.
    engine.executables.get(engine.mesh.devices).warm(sorted(engine.prefill_lengths_seen))
    coordinator = Coordinator(engine, standby=args.standby)
    if args.standby:
        engine.executables.wait_standby()
        print(f"standby programs compiled in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    runtime = Runtime(engine, coordinator=coordinator).start()
    config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
    server = ServerThread(runtime, config).start()
    return server, runtime, cfg.vocab_size, f"{cfg.name} on {len(devices)} {devices[0].platform}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051", help="Generation HOST:PORT")
    p.add_argument("--admin", default=None, help="Admin HOST:PORT (default: same host, 50052)")
    p.add_argument("--admin-token", default=None, help="default $ELASTIC_MOE_ADMIN_TOKEN")
    p.add_argument("--local", action="store_true", help="start an in-process server (CPU)")
    p.add_argument("--preset", default="tiny-mixtral", help="--local: the model")
    p.add_argument("--devices", type=int, default=8, help="--local: simulated devices")
    p.add_argument("--slots-per-device", type=int, default=4, help="--local: request slots")
    p.add_argument("--redundant-experts", type=int, default=None, help="--local: default E")
    p.add_argument(
        "--no-standby", dest="standby", action="store_false", help="--local: no standby compiles"
    )
    p.add_argument("--rate", type=float, default=8.0, help="requests per second (inf: at once)")
    p.add_argument("--num-requests", type=int, default=10_000, help="at most this many")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(4, 16), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--fail-at", nargs=2, metavar=("SECONDS", "DEVICE"), default=None)
    p.add_argument("--rejoin-at", type=float, default=None, metavar="SECONDS")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.fail_at:
        args.fail_at = (float(args.fail_at[0]), int(args.fail_at[1]))
    if args.rejoin_at is not None and not args.fail_at:
        p.error("--rejoin-at needs --fail-at")
    if args.rejoin_at is not None and args.rejoin_at <= args.fail_at[0]:
        p.error("--rejoin-at must come after --fail-at")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    server = runtime = None
    if args.local:
        server, runtime, vocab_size, what = start_local_server(args)
        target = f"127.0.0.1:{server.ports.generation}"
        admin_target = f"127.0.0.1:{server.ports.admin}"
    else:
        from serve.client import Client, admin_target_for

        target, admin_target = args.server, args.admin or admin_target_for(args.server)
        with Client(target, admin_target=admin_target, timeout=30) as client:
            info = client.model_info()
        vocab_size, what = info.vocab_size, f"{info.name} at {target}"
    try:
        samples, events, end = asyncio.run(run_load(args, target, admin_target, vocab_size))
    finally:
        if server is not None:
            server.stop()
            runtime.stop()
    report = summarize(samples, args, end)
    if args.json:
        print(json.dumps({"args": vars(args), "phases": report, "events": events}, default=str))
        return 0
    header = (
        f"bench_serving: {what}; {len(samples)} requests, Poisson rate {args.rate:g}/s over "
        f"{args.duration:g} s, prompt {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
        f"{args.max_tokens} output tokens; host {platform.machine()} x{os.cpu_count()} cores"
    )
    print_table(report, events, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
