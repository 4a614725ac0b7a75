"""The `elastic-moe` command line (also `python -m elastic_moe`): argparse and dispatch.

Each subcommand lives in its own module and is imported only when it runs, so `--help` and
argument errors are instant, and `XLA_FLAGS` (simulated CPU devices) is set before jax starts
its backends.
Exit codes: 0 ok, 1 failure (one line on stderr: `elastic-moe: error: ...`), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from serve.cli_common import ADMIN_TOKEN_ENV, CliError, simulate_devices

PROG = "elastic-moe"

DESCRIPTION = """\
A mixture-of-experts inference runtime on JAX that keeps serving when devices die.
On a machine without accelerators the devices are simulated CPU devices (--devices N)."""

EPILOG = """\
examples:
  elastic-moe demo                                   fail devices under live traffic
  elastic-moe presets                                the models you can name with --preset
  elastic-moe serve --preset tiny-fables --devices 8
  elastic-moe generate --server 127.0.0.1:50051 --prompt "THE FOX AND THE " --max-tokens 60
  elastic-moe mesh status
  elastic-moe mesh fail 3 --reason "ECC errors"
run `elastic-moe COMMAND --help` for a command's options."""

SERVE_EPILOG = """\
examples:
  elastic-moe serve --preset tiny-fables --devices 8
  elastic-moe serve --checkpoint ./Mixtral-8x7B-v0.1 --port 50051 --admin-port 50052
  elastic-moe serve --preset tiny-mixtral --port 0 --admin-port 0     (any free ports)
  elastic-moe serve --preset tiny-mixtral --workers auto              (one process per GPU)
  elastic-moe serve --preset tiny-mixtral --workers 2 --devices 4     (CPU: 2 devices each)
The server is ready once it prints, on stdout (one JSON object with --json):
  serving generation on 127.0.0.1:PORT, admin on 127.0.0.1:PORT
(progress goes to stderr). Port 0 picks a free port; --metrics-port 0 leaves metrics off.
SIGTERM or Ctrl-C drains: no new requests, running ones finish (up to --drain-timeout)."""

GENERATE_EPILOG = """\
examples:
  elastic-moe generate --server 127.0.0.1:50051 --prompt "THE FOX AND THE " --max-tokens 60
  elastic-moe generate --preset tiny-fables --prompt "THE LION AND THE " --max-tokens 80
  elastic-moe generate --preset tiny-mixtral --prompt-tokens 1,2,3,4,5 --max-tokens 32 --json
  elastic-moe generate --preset tiny-fables --devices 8 --prompt "THE FOX AND THE " \\
      --max-tokens 40 --inject-failure 5:0 --inject-failure 9:1 --inject-rejoin 20:0
Offline (no --server) the engine runs in this process. The request starts on the first device
of the run (device 0) and, re-prefilled after a loss, continues on the first survivor.
--inject-failure STEP:DEVICE breaks DEVICE before engine step STEP: the step fails, detection
finds the dead device, the mesh shrinks and the device's requests are re-prefilled on the
survivors. --inject-rejoin STEP:DEVICE repairs DEVICE and brings it back before step STEP.
Steps count from 0: step 0 prefills the prompt and decodes once, so it makes the first 2
tokens, and each later step makes 1 more (N tokens without faults take steps 0 to N-2); a
failed step makes none, and the step that re-prefills a request makes 2 again. With faults
injected the request runs again on a fresh engine without them and the tokens are compared:
"tokens equal: yes", or "no" and exit status 1 (--no-compare skips that run; --compare asks for
it when no fault is injected)."""

MESH_EPILOG = """\
examples:
  elastic-moe mesh status                 devices, expert slots, the last reconfiguration
  elastic-moe mesh watch                  follow changes live (Ctrl-C to stop)
  elastic-moe mesh fail 3 --reason maintenance
  elastic-moe mesh fail 3 5 --dry-run     what would move, changing nothing
  elastic-moe mesh rejoin 3 5
  elastic-moe mesh rebalance
  elastic-moe mesh status --admin 10.0.0.7:50052 --admin-token "$TOKEN" --json
The admin token defaults to $ELASTIC_MOE_ADMIN_TOKEN."""

DEMO_EPILOG = """\
examples:
  elastic-moe demo
  elastic-moe demo --no-live             plain lines (CI logs)
  elastic-moe demo --requests 24 --max-tokens 64
Starts a server on simulated CPU devices, streams requests through the gRPC client, fails two
devices and rejoins them, then checks every output against a failure-free run. Exits 0 only
when no request was lost and every output is unchanged."""

PRESETS_EPILOG = """\
examples:
  elastic-moe presets
  elastic-moe presets --json
Random-weight presets print byte noise as text; use --prompt-tokens with them, or a trained
model (tiny-fables) for readable text."""

BENCH_EPILOG = """\
examples:
  elastic-moe bench --list
  elastic-moe bench placement
  elastic-moe bench load --size-mb 200
  elastic-moe bench                       every benchmark, one after the other
NAME runs benchmarks/bench_NAME.py (python -m benchmarks.bench_NAME ARGS...)."""


INT32_MAX = 2**31 - 1  # what the gRPC messages hold (int32 token ids and top_k)


def _int_in(low: int, high: int, what: str):
    """An argparse type: an integer in [low, high]; anything else is a usage error naming
    `what` (a traceback once, when the value reached the gRPC message or the sampler)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_in(1, INT32_MAX, "a positive integer below 2**31")
_non_negative_int = _int_in(0, INT32_MAX, "an integer >= 0 below 2**31")
_seed = _int_in(0, 2**32 - 1, "a seed in [0, 2**32)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _token_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids like 1,2,3, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    bad = [i for i in ids if not 0 <= i <= INT32_MAX]
    if bad:
        raise argparse.ArgumentTypeError(f"token ids are in [0, 2**31), got {bad[0]}")
    return ids


def _step_device(text: str) -> tuple[int, int]:
    step, sep, device = text.partition(":")
    try:
        if not sep:
            raise ValueError
        parsed = int(step), int(device)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEP:DEVICE like 5:3, got {text!r}") from None
    if parsed[0] < 0 or parsed[1] < 0:
        raise argparse.ArgumentTypeError(f"STEP and DEVICE must be >= 0, got {text!r}")
    return parsed


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT like 127.0.0.1:50051, got {text!r}")
    return text


def _add_model_source(parser: argparse.ArgumentParser, required: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--preset",
        metavar="NAME",
        help="a named model: a preset (random weights) or a model the project trained "
        "(`elastic-moe presets` lists them)",
    )
    source.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a Hugging Face model directory (config.json + *.safetensors) or an orbax "
        "checkpoint written by elastic-moe",
    )


def _add_engine_options(parser: argparse.ArgumentParser, devices_help: str) -> None:
    parser.add_argument("--devices", type=_positive_int, metavar="N", help=devices_help)
    parser.add_argument(
        "--redundant-experts",
        type=_non_negative_int,
        metavar="R",
        help="extra expert slots over the whole mesh, beyond the model's experts; with R >= "
        "num_experts a device loss needs no weight copy (default: the model's expert count, "
        "one spare replica of each expert; 0 on one device. The Python API's "
        "EngineOptions.redundant_experts defaults to 0)",
    )
    parser.add_argument(
        "--request-slots-per-device",
        type=_positive_int,
        default=4,
        metavar="B",
        help="concurrent requests per device (default 4)",
    )
    parser.add_argument(
        "--placement",
        choices=("auto", "balance", "survive"),
        default="auto",
        help="where expert replicas go: auto (default) balances load while one device loss "
        "restores at most 2 experts per layer from the host; survive gives every expert a "
        "second replica first (no restore after one loss, but no slot left to follow load at "
        "R = num_experts); balance is pure EPLB",
    )
    parser.add_argument(
        "--numerics",
        choices=("invariant", "fast"),
        default="invariant",
        help="invariant (default): every token's expert outputs are summed on its own device "
        "in a fixed order in float32, so a failure, a rejoin or a smaller mesh changes no "
        "token, even in bf16; fast: the devices' partial sums are added by a reduce-scatter "
        "(the order follows the mesh, so in bf16 tokens may change with it)",
    )
    parser.add_argument(
        "--layers-per-program",
        type=_non_negative_int,
        default=0,
        metavar="G",
        help="G > 0: compile programs of G layers each and chain them every step, instead of "
        "one program with every layer unrolled (0, the default): a mesh's compile time stops "
        "growing with depth (deep models: the standby compiles of every mesh one failure "
        "away, and any compile on a recovery's path), for one launch per G layers; same tokens",
    )


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    return _int_in(1, 1024, "a number of workers (1 to 1024) or auto")(text)


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "worker processes (docs/WORKERS.md)",
        "With --workers this process is the frontend: it owns no accelerator, hosts JAX's "
        "coordination service and every request, and starts N worker processes (one per GPU, "
        "or on CPU --devices/N simulated devices each); a worker killed with kill -9 is "
        "survived by the others.",
    )
    group.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="serve through N worker processes under jax.distributed; auto: one per visible "
        "GPU (default: one process drives every device)",
    )
    group.add_argument(
        "--worker-platform",
        choices=("cpu", "gpu"),
        help="what the workers run on (default: gpu when this host has one, else cpu)",
    )
    group.add_argument(
        "--heartbeat-timeout",
        type=_positive_int,
        default=2,
        metavar="S",
        help="a worker silent for S s is declared dead (default 2; detection takes about S)",
    )
    group.add_argument(
        "--collective-timeout",
        type=_positive_int,
        default=10,
        metavar="S",
        help="CPU workers: the bound on one collective with a dead peer (default 10)",
    )
    group.add_argument(
        "--step-timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="a worker that does not answer a step within S s is killed (default 60)",
    )
    group.add_argument(
        "--auto-rejoin",
        action="store_true",
        help="restart a dead worker at once and bring its devices back when it has connected "
        "(default: `elastic-moe mesh rejoin` does)",
    )
    group.add_argument(
        "--rejoin-mode",
        choices=("restart", "in-place"),
        default="restart",
        help="restart (default): a rejoin starts every worker again in a new cluster (serving "
        "pauses for a full start; every request is kept and re-prefilled); in-place: only the "
        "dead worker restarts and joins the running cluster, which JAX does not allow yet (the "
        "rejoin is then undone; docs/WORKERS.md)",
    )
    group.add_argument("--worker-logs", metavar="DIR", help="write each worker's output here")
    group.add_argument(
        "--local-workers",
        type=_int_in(0, 1024, "a number of workers"),
        metavar="K",
        help="start workers 0..K-1 on this host (default: all N); workers K..N-1 are started on "
        "other hosts with the command this prints, and the same $ELASTIC_MOE_WORKER_AUTHKEY",
    )
    group.add_argument(
        "--cluster-address",
        default="127.0.0.1",
        metavar="HOST",
        help="this host's address the workers connect to (default 127.0.0.1: one host)",
    )
    group.add_argument(
        "--service-port",
        type=_port,
        metavar="P",
        help="port of JAX's coordination service on this host (default: any free one)",
    )
    group.add_argument(
        "--channel-port",
        type=_port,
        default=0,
        metavar="Q",
        help="port where the workers' step channels connect (default: any free one)",
    )


def _add_admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        type=_host_port,
        default="127.0.0.1:50052",
        metavar="HOST:PORT",
        help="the server's Admin address (default 127.0.0.1:50052)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get(ADMIN_TOKEN_ENV) or None,
        metavar="T",
        help=f"bearer token for the Admin API (default ${ADMIN_TOKEN_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="give up on the call after S s (default: 30 for status, 300 for operations)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    # ---- serve --------------------------------------------------------------------------
    serve = commands.add_parser(
        "serve",
        help="serve a model over gRPC (Generation + Admin)",
        description="Serve a model over gRPC: Generation on --port, Admin on --admin-port.",
        epilog=SERVE_EPILOG,
        formatter_class=formatter,
    )
    _add_model_source(serve, required=True)
    _add_engine_options(serve, "devices to serve on (default: every accelerator, or 8 CPU)")
    serve.add_argument(
        "--port", type=_port, default=50051, metavar="P", help="default 50051; 0: any free port"
    )
    serve.add_argument(
        "--admin-port",
        type=_port,
        default=50052,
        metavar="A",
        help="default 50052; 0: any free port",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the Generation service binds (default 127.0.0.1; 0.0.0.0 for all)",
    )
    serve.add_argument(
        "--admin-token",
        default=os.environ.get(ADMIN_TOKEN_ENV) or None,
        metavar="T",
        help=f"require this bearer token on Admin calls (default ${ADMIN_TOKEN_ENV}); without "
        "one the Admin API binds 127.0.0.1 only",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        metavar="M",
        help="serve Prometheus /metrics on 127.0.0.1:M (default, and 0: off)",
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key (with --tls-cert)")
    serve.add_argument(
        "--no-standby",
        action="store_true",
        help="do not compile the programs of the single-failure meshes ahead of time",
    )
    serve.add_argument(
        "--wait-standby",
        action="store_true",
        help="serve only once the single-failure meshes are compiled (default: they compile "
        "in the background while serving)",
    )
    serve.add_argument(
        "--repair-budget-mb",
        type=_non_negative_int,
        default=256,
        metavar="MB",
        help="after a loss or a rejoin, restore redundancy and balance in the background, at "
        "most MB of expert copies per step (default 256; 0: only on `mesh rebalance`)",
    )
    serve.add_argument(
        "--repair-interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between two background repair steps (default 1)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/Ctrl-C, how long running requests may take to finish (default 30)",
    )
    serve.add_argument("--json", action="store_true", help="print the bound addresses as JSON")
    _add_worker_options(serve)

    # ---- generate -----------------------------------------------------------------------
    gen = commands.add_parser(
        "generate",
        help="generate from a prompt, on a server or offline",
        description="Generate tokens from a prompt, through a server or offline in-process.",
        epilog=GENERATE_EPILOG,
        formatter_class=formatter,
    )
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (tokenized by the model)")
    prompt.add_argument(
        "--prompt-tokens", type=_token_list, metavar="1,2,3", help="prompt token ids"
    )
    gen.add_argument(
        "--max-tokens", type=_positive_int, required=True, metavar="N", help="tokens to generate"
    )
    target = gen.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--server", type=_host_port, metavar="HOST:PORT", help="a running elastic-moe server"
    )
    target.add_argument(
        "--preset",
        metavar="NAME",
        help="offline: a named model (`elastic-moe presets` lists them)",
    )
    target.add_argument("--checkpoint", metavar="DIR", help="offline: a model directory")
    _add_engine_options(gen, "offline: devices to run on (default 8)")
    gen.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"
    )
    gen.add_argument("--top-p", type=float, default=0.0, metavar="P", help="0 = off (default)")
    gen.add_argument(
        "--top-k", type=_non_negative_int, default=0, metavar="K", help="0 = off (default)"
    )
    gen.add_argument("--seed", type=_seed, default=0, metavar="S", help="sampling seed (default 0)")
    gen.add_argument(
        "--stop-token-ids", type=_token_list, default=[], metavar="1,2", help="stop on these"
    )
    gen.add_argument(
        "--inject-failure",
        type=_step_device,
        action="append",
        default=[],
        metavar="STEP:DEVICE",
        help="offline: break DEVICE before engine step STEP (repeatable; step 0 makes the "
        "first 2 tokens, each later step 1 more: see below)",
    )
    gen.add_argument(
        "--inject-rejoin",
        type=_step_device,
        action="append",
        default=[],
        metavar="STEP:DEVICE",
        help="offline: repair DEVICE and rejoin it before engine step STEP (repeatable)",
    )
    gen.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offline: run the request again without faults and say whether the tokens are "
        "equal (default: on when faults are injected)",
    )
    gen.add_argument("--timeout", type=float, metavar="S", help="--server: request deadline")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (token_ids, logprobs, text, finish_reason, epochs, "
        "tokens_equal, ...)",
    )
    gen.add_argument("--tokens", action="store_true", help="stream token ids instead of text")

    # ---- mesh ---------------------------------------------------------------------------
    mesh = commands.add_parser(
        "mesh",
        help="inspect and change a server's device mesh (Admin API)",
        description="Inspect and change a running server's device mesh through its Admin API.",
        epilog=MESH_EPILOG,
        formatter_class=formatter,
    )
    mesh_commands = mesh.add_subparsers(dest="mesh_command", metavar="ACTION", required=True)
    status = mesh_commands.add_parser(
        "status",
        description=(
            "Show the server's devices, their state, the expert slots and replicas, and the "
            "last reconfiguration with its pause breakdown."
        ),
        help="devices, expert slots, replicas and the last reconfiguration",
        epilog="example: elastic-moe mesh status --json",
        formatter_class=formatter,
    )
    _add_admin_options(status)
    watch = mesh_commands.add_parser(
        "watch",
        description="Follow the mesh live: redraw the status after every change, until Ctrl-C.",
        help="follow the mesh live until Ctrl-C",
        epilog="example: elastic-moe mesh watch    (--json prints one object per change)",
        formatter_class=formatter,
    )
    _add_admin_options(watch)
    fail = mesh_commands.add_parser(
        "fail",
        description=(
            "Declare devices failed: the server moves serving onto the survivors and "
            "re-prefills the failed devices' requests. --dry-run shows the plan only."
        ),
        help="declare devices failed and reconfigure onto the survivors",
        epilog='example: elastic-moe mesh fail 3 --reason "ECC errors" --op-id maint-42',
        formatter_class=formatter,
    )
    fail.add_argument(
        "device_ids", type=_non_negative_int, nargs="+", metavar="ID", help="device ids"
    )
    fail.add_argument("--reason", default="", help="recorded in the reconfiguration's cause")
    fail.add_argument("--dry-run", action="store_true", help="plan only: change nothing")
    fail.add_argument("--op-id", default="", help="repeating an op id repeats nothing")
    _add_admin_options(fail)
    rejoin = mesh_commands.add_parser(
        "rejoin",
        description=(
            "Bring failed devices back: they get expert slots, experts and request capacity again."
        ),
        help="bring failed devices back into the mesh",
        epilog="example: elastic-moe mesh rejoin 3 5",
        formatter_class=formatter,
    )
    rejoin.add_argument(
        "device_ids", type=_non_negative_int, nargs="+", metavar="ID", help="device ids"
    )
    rejoin.add_argument("--op-id", default="", help="repeating an op id repeats nothing")
    _add_admin_options(rejoin)
    rebalance = mesh_commands.add_parser(
        "rebalance",
        description=(
            "Re-place the experts by the load the router observed, online, without stopping "
            "generation."
        ),
        help="re-place experts by observed load, online",
        epilog="example: elastic-moe mesh rebalance --json",
        formatter_class=formatter,
    )
    rebalance.add_argument("--op-id", default="", help="repeating an op id repeats nothing")
    rebalance.add_argument(
        "--max-copies",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="move at most N experts now, the most useful first; the result says how many "
        "such steps remain (default 0: the whole rebalance at once)",
    )
    _add_admin_options(rebalance)
    verify = mesh_commands.add_parser(
        "verify",
        description=(
            "Check every expert slot of the serving mesh against its expert's checksum, on the "
            "devices, between two steps. A wrong slot is named (which expert it holds instead) "
            "and rewritten from the host copy, unless --check-only. Every reconfiguration "
            "already checks the slots it wrote; this checks them all. Exits 1 when a slot was "
            "wrong."
        ),
        help="check every expert slot's weights on the devices",
        epilog="example: elastic-moe mesh verify --json",
        formatter_class=formatter,
    )
    verify.add_argument(
        "--check-only", action="store_true", help="report wrong slots without rewriting them"
    )
    _add_admin_options(verify)

    # ---- demo ---------------------------------------------------------------------------
    demo = commands.add_parser(
        "demo",
        help="fail devices under live traffic and show that nothing is lost",
        description="The embedded demo (what `make demo` runs).",
        epilog=DEMO_EPILOG,
        formatter_class=formatter,
    )
    demo.add_argument("--devices", type=_positive_int, default=8, metavar="N", help="default 8")
    demo.add_argument("--requests", type=_positive_int, default=12, metavar="N", help="default 12")
    demo.add_argument(
        "--max-tokens", type=_positive_int, default=48, metavar="N", help="default 48"
    )
    demo.add_argument("--preset", default="tiny-mixtral", metavar="NAME", help=argparse.SUPPRESS)
    demo.add_argument(
        "--step-ms",
        type=float,
        default=25.0,
        metavar="MS",
        help="pace engine steps to at least MS ms so that the traffic can be watched "
        "(default 25; 0 = full speed)",
    )
    demo.add_argument(
        "--standby-wait",
        type=float,
        default=20.0,
        metavar="S",
        help="wait at most S s for the standby compiles before the traffic starts (default 20)",
    )
    demo.add_argument("--no-live", action="store_true", help="plain lines, no live display")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")

    # ---- presets ------------------------------------------------------------------------
    presets = commands.add_parser(
        "presets",
        help="list the models --preset accepts, with their shapes",
        description="List the models --preset accepts: tiny random ones for tests and the "
        "demo, real shapes with random weights for benchmarks, and the models the project "
        "trained.",
        epilog=PRESETS_EPILOG,
        formatter_class=formatter,
    )
    presets.add_argument("--json", action="store_true", help="print one JSON object")

    # ---- bench --------------------------------------------------------------------------
    bench = commands.add_parser(
        "bench",
        help="run the benchmarks under benchmarks/",
        description="Run a benchmark script: NAME runs benchmarks/bench_NAME.py.",
        epilog=BENCH_EPILOG,
        formatter_class=formatter,
    )
    bench.add_argument("name", nargs="?", metavar="NAME", help="decode, recovery, ...")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; .error exits 2 with the command's own usage."""
    command = _command_parser(parser, args.command)
    if args.command == "generate" and args.server is not None:
        server_way = "; on a server use `elastic-moe mesh fail/rejoin`"
        for flag in ("inject_failure", "inject_rejoin", "compare"):
            if getattr(args, flag):
                command.error(
                    f"--{flag.replace('_', '-')} works offline only (--preset or --checkpoint)"
                    + ("" if flag == "compare" else server_way)
                )
    if args.command == "serve" and (args.tls_cert is None) != (args.tls_key is None):
        command.error("--tls-cert and --tls-key go together")
    if args.command == "serve" and args.workers is None:
        for flag in ("worker_platform", "auto_rejoin", "worker_logs", "local_workers"):
            if getattr(args, flag):
                command.error(f"--{flag.replace('_', '-')} goes with --workers")


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand's parser, so that a usage error prints that command's usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("elastic-moe")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _run(args: argparse.Namespace) -> int:
    # Simulated CPU devices must be configured before anything imports jax.
    if args.command == "serve" and args.workers is not None:
        # The frontend of worker processes owns no accelerator (its JAX stays on the CPU).
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif args.command in ("serve", "demo") or (args.command == "generate" and not args.server):
        simulate_devices(args.devices)
    if args.command == "serve":
        from serve.cli_serve import run_serve

        return run_serve(args)
    if args.command == "generate":
        from serve.cli_generate import run_generate

        return run_generate(args)
    if args.command == "mesh":
        from serve.cli_mesh import run_mesh

        return run_mesh(args)
    if args.command == "demo":
        from serve.demo import run_demo

        return run_demo(args)
    if args.command == "bench":
        from serve.cli_bench import run_bench

        return run_bench(args)
    if args.command == "presets":
        from serve.cli_presets import run_presets

        return run_presets(args)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _check_args(parser, args)
    try:
        code = _run(args)
    except CliError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `elastic-moe ... | head`
        sys.stderr.close()
        code = 1
    if argv is None:
        _exit_without_waiting_for_standby(code)
    return code


def _exit_without_waiting_for_standby(code: int) -> None:
    """Run as a program, don't wait at exit for a standby compile nobody will use (seconds)."""
    import threading

    if any(t.name.startswith("standby-compile") and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
