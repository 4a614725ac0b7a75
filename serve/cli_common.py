"""What every `elastic-moe` subcommand shares: user errors, simulated devices, model loading,
and how a reconfiguration is reported.

Nothing here imports jax at module level: `XLA_FLAGS` must be set before the first jax import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_CPU_DEVICES = 8
# XLA makes every simulated device when jax starts; 10,000 of them hung a run until killed.
# The design's largest meshes have 256 devices.
MAX_SIMULATED_DEVICES = 256
ADMIN_TOKEN_ENV = "ELASTIC_MOE_ADMIN_TOKEN"

# The fields of a Reconfiguration, in the order they are reported (proto and dataclass alike).
RECONFIGURATION_FIELDS = (
    "from_epoch",
    "to_epoch",
    "cause",
    "pause_ms",
    "detect_ms",
    "plan_ms",
    "transfer_ms",
    "compile_ms",
    "experts_copied",
    "experts_restored_from_host",
    "requests_reprefilled",
)


class CliError(Exception):
    """A user error: main() prints `elastic-moe: error: <message>` and exits 1."""


# ---- devices ------------------------------------------------------------------------------
def simulate_devices(count: int | None) -> None:
    """Lets the CPU platform show at least `count` devices (8 when None).

    Must run before jax's backends start (XLA reads XLA_FLAGS then, not at import); appends to
    any XLA_FLAGS already set and never lowers a larger count. On a machine with accelerators
    this only adds host devices nobody uses. A count above MAX_SIMULATED_DEVICES makes none:
    pick_devices then refuses it, saying how many devices there are.
    """
    if _backends_started():
        return
    wanted = count or DEFAULT_CPU_DEVICES
    if wanted > MAX_SIMULATED_DEVICES:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(rf"{DEVICE_COUNT_FLAG}=(\d+)", flags)
    if found and int(found.group(1)) >= wanted:
        return
    if found:
        flags = flags.replace(found.group(0), "")
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={wanted}".strip()


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def pick_devices(count: int | None) -> list:
    """The first `count` devices of the default backend (all accelerators, or 8 CPU devices)."""
    import jax

    devices = jax.devices()
    if count is None:
        count = len(devices) if devices[0].platform != "cpu" else DEFAULT_CPU_DEVICES
    if count < 1:
        raise CliError(f"--devices must be at least 1, got {count}")
    if count > len(devices):
        platform, plural = devices[0].platform, "s" if len(devices) != 1 else ""
        simulated = f" (simulated: --devices N makes up to {MAX_SIMULATED_DEVICES})"
        raise CliError(
            f"--devices {count}: this machine has {len(devices)} {platform} device{plural}"
            + (simulated if platform == "cpu" else "")
        )
    return list(devices[:count])


def enable_compilation_cache() -> None:
    """The persistent XLA compilation cache, so that a second run skips compiles (best effort)."""
    if os.environ.get("ELASTIC_MOE_NO_COMPILATION_CACHE"):
        return
    try:
        from elastic_moe.executables import enable_persistent_cache

        enable_persistent_cache()
    except OSError:
        pass


# ---- models -------------------------------------------------------------------------------
def check_model_source(preset: str | None, checkpoint: str | None) -> None:
    """Fails fast (before jax is imported) on an unknown preset or a missing directory."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise CliError(f"checkpoint directory {checkpoint} does not exist")
        if not path.is_dir():
            raise CliError(f"--checkpoint {checkpoint} is not a directory")
        return
    from models.presets import PRESETS, trained_configs

    known = list(PRESETS) + list(trained_configs())
    if preset not in known:
        raise CliError(
            f"unknown preset {preset!r}; known presets: {', '.join(known)} "
            "(`elastic-moe presets` shows their shapes)"
        )


def load_model(preset: str | None, checkpoint: str | None, *, progress: bool = False):
    """(config, host params, tokenizer) of a preset (random weights, seed 0) or a directory."""
    check_model_source(preset, checkpoint)
    if checkpoint is not None:
        from elastic_moe.checkpoint import load_model_dir

        try:
            loaded = load_model_dir(checkpoint, progress=progress)
        except (ValueError, OSError) as error:
            raise CliError(str(error)) from None
        except (KeyError, TypeError, AttributeError) as error:  # a manifest of the wrong shape
            raise CliError(f"{checkpoint}: cannot load: {type(error).__name__}: {error}") from None
        return loaded  # both loaders refuse NaN and infinite weights, naming the tensor
    from elastic_moe.checkpoint import load_model as load_named

    # A preset (random weights, seed 0, byte tokenizer) or a model the project trained.
    return load_named(preset)


def build_engine(
    cfg,
    params,
    devices,
    *,
    request_slots_per_device: int,
    redundant: int,
    placement: str = "auto",
    numerics: str = "invariant",
    overlap_steps: bool = True,
    layers_per_program: int = 0,
):
    """An Engine, or a one-line CliError when the model cannot be deployed on these devices."""
    from elastic_moe import Engine, EngineOptions

    options = EngineOptions(
        request_slots_per_device=request_slots_per_device,
        redundant_experts=redundant,
        placement=placement,
        numerics=numerics,
        overlap_steps=overlap_steps,
        layers_per_program=layers_per_program,
    )
    try:
        return Engine(cfg, params, devices, options)
    except ValueError as error:
        raise CliError(f"cannot deploy {cfg.name} on {len(devices)} devices: {error}") from None


# ---- gRPC errors ----------------------------------------------------------------------------
@contextlib.contextmanager
def rpc_errors(target: str) -> Iterator[None]:
    """Turns a grpc.RpcError into a one-line CliError naming the server."""
    import grpc

    try:
        yield
    except grpc.RpcError as error:
        raise CliError(describe_rpc_error(error, target)) from None


def describe_rpc_error(error: Any, target: str) -> str:
    import grpc

    code = error.code() if callable(getattr(error, "code", None)) else None
    details = (error.details() if callable(getattr(error, "details", None)) else "") or str(error)
    details = " ".join(details.split())
    if code == grpc.StatusCode.UNAVAILABLE:
        if getattr(error, "admin_target", None):  # serve.client.AdminUnreachable names it
            return details
        return f"cannot reach {target}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{target} did not answer in time: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"{target} needs the admin token: pass --admin-token TOKEN or set "
            f"${ADMIN_TOKEN_ENV} (the server said: {details})"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (
            f"{target} refused the admin token: check --admin-token or ${ADMIN_TOKEN_ENV} "
            f"(the server said: {details})"
        )
    return details if code is None else f"{details} ({code.name})"


# ---- reporting ----------------------------------------------------------------------------
def reconfiguration_dict(summary: Any) -> dict[str, Any]:
    """A Reconfiguration (the runtime's dataclass, the proto message, or already a dict)."""
    if isinstance(summary, dict):
        return dict(summary)
    if dataclasses.is_dataclass(summary):
        out = dataclasses.asdict(summary)
        out["kind"] = summary.kind.value
        return out
    out = {name: getattr(summary, name) for name in RECONFIGURATION_FIELDS}
    for extra in (
        "dry_run",
        "standby_hit",
        "slots_verified",
        "slots_repaired",
        "verify_ms",
        "slots_lost",
    ):
        if hasattr(summary, extra):
            out[extra] = getattr(summary, extra)
    if hasattr(summary, "moves"):
        out["moves"] = [
            {f: getattr(m, f) for f in ("layer", "expert", "to_device", "from_device")}
            for m in summary.moves
        ]
    if hasattr(summary, "kind"):  # the proto enum: KIND_FAIL -> "fail"
        name = summary.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number
        out["kind"] = name[summary.kind].name.removeprefix("KIND_").lower()
    return out


def reconfiguration_line(summary: Any) -> str:
    """One line: epochs, cause, pause and where the time went, what moved."""
    r = reconfiguration_dict(summary)
    arrow = f"epoch {r['from_epoch']} -> {r['to_epoch']}"
    if r.get("dry_run"):
        arrow = f"dry run at epoch {r['from_epoch']}"
    return (
        f"{arrow}: {r['cause']}: pause {r['pause_ms']:.1f} ms (detect {r['detect_ms']:.1f}, "
        f"plan {r['plan_ms']:.1f}, transfer {r['transfer_ms']:.1f}, compile "
        f"{r['compile_ms']:.1f}); {r['experts_copied']} experts copied, "
        f"{r['experts_restored_from_host']} restored from host, "
        f"{r['requests_reprefilled']} requests re-prefilled"
    )


def reconfiguration_table(summary: Any, title: str = "reconfiguration"):
    """A rich table of one reconfiguration's breakdown."""
    from rich.table import Table

    r = reconfiguration_dict(summary)
    if r.get("dry_run"):
        return plan_table(r, title)
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("epoch", f"{r['from_epoch']} -> {r['to_epoch']}")
    table.add_row("cause", str(r["cause"]))
    table.add_row("pause", f"{r['pause_ms']:.1f} ms")
    for phase in ("detect", "plan", "transfer", "compile"):
        table.add_row(f"  {phase}", f"{r[f'{phase}_ms']:.1f} ms")
    table.add_row("experts copied", str(r["experts_copied"]))
    table.add_row("experts restored from host", str(r["experts_restored_from_host"]))
    table.add_row("requests re-prefilled", str(r["requests_reprefilled"]))
    if "standby_hit" in r:
        table.add_row("standby programs ready", "yes" if r["standby_hit"] else "no")
    if "slots_verified" in r:
        table.add_row("slots checked (checksum)", str(r["slots_verified"]))
        table.add_row("wrong slots rewritten", str(r["slots_repaired"]))
    return table


MOVES_SHOWN = 24


def plan_table(r: dict[str, Any], title: str):
    """What a dry run would do: what is lost, what moves where, and whether the new mesh's
    programs are already compiled (nothing is timed: nothing ran)."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("epoch", f"{r['from_epoch']} (unchanged)")
    table.add_row("cause", str(r["cause"]))
    table.add_row("planned in", f"{r['plan_ms']:.1f} ms")
    table.add_row("expert slots lost (all layers)", str(r.get("slots_lost", 0)))
    table.add_row("experts to copy device to device", str(r["experts_copied"]))
    table.add_row("experts to restore from host", str(r["experts_restored_from_host"]))
    table.add_row("requests to re-prefill", str(r["requests_reprefilled"]))
    if "standby_hit" in r:
        ready = "yes" if r["standby_hit"] else "no (the move would compile them)"
        table.add_row("standby programs ready", ready)
    moves = r.get("moves") or []
    if not moves:
        table.add_row("moves", "none: the survivors' slots already hold every expert")
        return table
    listing = Table(title_justify="left", box=None, padding=(0, 2))
    listing.title = f"moves ({min(len(moves), MOVES_SHOWN)} of {len(moves)} shown)"
    for column in ("layer", "expert", "from", "to device"):
        listing.add_column(column, justify="right")
    for m in moves[:MOVES_SHOWN]:
        source = "host" if m["from_device"] < 0 else f"device {m['from_device']}"
        listing.add_row(str(m["layer"]), str(m["expert"]), source, str(m["to_device"]))
    return Group(table, listing)


def make_console(stderr: bool = False):
    """A rich Console; when writing to a pipe or file (logs) and $COLUMNS is not set, 160
    columns wide instead of rich's 80, so that tables are not squeezed."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(stderr=stderr, highlight=False, width=160)
    return out


def printable(text: str) -> str:
    """`text` with control characters (but newlines and tabs) escaped, so that model output
    cannot move the cursor, clear or retitle a terminal: "\x1b" prints as the 4 characters
    \x1b. The text a model makes is whatever it samples (random weights: any byte)."""
    return "".join(_escape(c) for c in text)


def _escape(char: str) -> str:
    if char in "\n\t" or unicodedata.category(char) != "Cc":
        return char
    return repr(char)[1:-1]


def print_json(obj: Any) -> None:
    import json

    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
