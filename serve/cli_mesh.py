"""`elastic-moe mesh status | watch | fail | rejoin | rebalance | verify`: the Admin API from a
shell.

`status` draws the devices (state, expert slots, the experts each one holds, active requests),
the mesh (epoch, state, minimum live replicas) and the last reconfiguration's breakdown.
`watch` redraws it after every change until Ctrl-C. The operations print their breakdown.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from serve.cli_common import (
    CliError,
    make_console,
    print_json,
    reconfiguration_dict,
    reconfiguration_table,
    rpc_errors,
)

STATE_STYLES = {
    "HEALTHY": "green",
    "FAILED": "bold red",
    "REJOINING": "yellow",
    "SERVING": "green",
    "RECONFIGURING": "yellow",
    "DEGRADED": "bold yellow",
    "DRAINING": "magenta",
}
LAYERS_SHOWN = 3  # experts held: the first layers, then "..."


def run_mesh(args: argparse.Namespace) -> int:
    from serve.client import Client

    action = args.mesh_command
    with rpc_errors(args.admin):
        client = Client(
            target=args.admin,
            admin_target=args.admin,
            admin_token=args.admin_token,
            timeout=_timeout(args),
        )
        try:
            if action == "status":
                return _status(client, args)
            if action == "watch":
                return _watch(client, args)
            if action == "verify":
                return _verify(client, args)
            if action == "fail":
                result = client.fail(
                    list(args.device_ids),
                    reason=args.reason,
                    op_id=args.op_id,
                    dry_run=args.dry_run,
                )
            elif action == "rejoin":
                result = client.rejoin(list(args.device_ids), op_id=args.op_id)
            elif action == "rebalance":
                result = client.rebalance(op_id=args.op_id, max_copies=args.max_copies)
            else:
                raise AssertionError(action)
            return _print_result(result, args)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()


def _timeout(args: argparse.Namespace) -> float | None:
    """Seconds an Admin call may take: none for watch; operations may compile programs."""
    if args.mesh_command == "watch":
        return None
    if args.timeout is not None:
        return args.timeout
    return 30.0 if args.mesh_command == "status" else 300.0


# ---- conversions --------------------------------------------------------------------------
def _enum_name(message: Any, field: str) -> str:
    value = getattr(message, field)
    enum = message.DESCRIPTOR.fields_by_name[field].enum_type
    return enum.values_by_number[value].name if value in enum.values_by_number else str(value)


def status_dict(status: Any) -> dict[str, Any]:
    """A pb.MeshStatus as a plain dict (enum names, every field present)."""
    devices = []
    for d in status.devices:
        device = {
            "id": d.id,
            "platform": d.platform,
            "state": _enum_name(d, "state"),
            "process_index": d.process_index,
            "expert_slots": d.expert_slots,
            "active_requests": d.active_requests,
        }
        if hasattr(d, "experts"):
            device["experts"] = [list(layer.ids) for layer in d.experts]
        devices.append(device)
    return {
        "epoch": status.epoch,
        "state": _enum_name(status, "state"),
        "devices": devices,
        "num_logical_experts": status.num_logical_experts,
        "num_physical_slots": status.num_physical_slots,
        "min_live_replicas": status.min_live_replicas,
        "placement_policy": status.placement_policy,
        "max_device_load": status.max_device_load,
        "worst_single_loss_restore": status.worst_single_loss_restore,
        "numerics": status.numerics,
        "active_requests": status.active_requests,
        "queued_requests": status.queued_requests,
        "last": reconfiguration_dict(status.last) if status.HasField("last") else None,
    }


def result_dict(result: Any) -> dict[str, Any]:
    return {"epoch": result.epoch, "summary": reconfiguration_dict(result.summary)}


# ---- rendering ----------------------------------------------------------------------------
def _styled(state: str) -> str:
    style = STATE_STYLES.get(state)
    return f"[{style}]{state.lower()}[/]" if style else state.lower()


def _experts_held(layers: list[list[int]], uniform: bool) -> str:
    if not layers:
        return "-"
    if uniform:
        return " ".join(map(str, layers[0]))
    shown = [f"L{j}: {' '.join(map(str, ids))}" for j, ids in enumerate(layers[:LAYERS_SHOWN])]
    return " | ".join(shown) + (" | ..." if len(layers) > LAYERS_SHOWN else "")


def status_renderable(status: dict[str, Any]):
    """A rich renderable of a status_dict: summary line, devices table, last reconfiguration."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    header = Text.from_markup(
        f"[bold]mesh epoch {status['epoch']}[/]  {_styled(status['state'])}  "
        f"{status['num_logical_experts']} experts in {status['num_physical_slots']} slots, "
        f"min live replicas {status['min_live_replicas']}  "
        f"placement {status['placement_policy']}: max/mean device load "
        f"{status['max_device_load']:.2f}, one more loss restores at most "
        f"{status['worst_single_loss_restore']} experts per layer from the host  "
        f"numerics {status['numerics']}  "
        f"requests: {status['active_requests']} active, {status['queued_requests']} queued"
    )
    # Experts held per MoE layer; one list when every layer has the same placement.
    uniform = all(
        all(layer == d["experts"][0] for layer in d["experts"])
        for d in status["devices"]
        if d.get("experts")
    )
    layers = max((len(d.get("experts", [])) for d in status["devices"]), default=0)
    held = "experts held" + (f" (all {layers} layers)" if uniform and layers > 1 else "")
    table = Table(title_justify="left", expand=False)
    table.add_column("device", justify="right")
    table.add_column("platform")
    table.add_column("state")
    table.add_column("process", justify="right")
    table.add_column("slots", justify="right")
    table.add_column(held)
    table.add_column("requests", justify="right")
    for d in status["devices"]:
        table.add_row(
            str(d["id"]),
            d["platform"],
            _styled(d["state"]),
            str(d["process_index"]),
            str(d["expert_slots"]),
            _experts_held(d.get("experts", []), uniform),
            str(d["active_requests"]),
        )
    parts: list[Any] = [header, table]
    if status["last"] is not None:
        parts.append(reconfiguration_table(status["last"], title="last reconfiguration"))
    else:
        parts.append(Text("no reconfiguration yet", style="dim"))
    return Group(*parts)


# ---- actions ------------------------------------------------------------------------------
def _status(client: Any, args: argparse.Namespace) -> int:
    status = status_dict(client.mesh_status())
    if args.json:
        print_json(status)
    else:
        make_console().print(status_renderable(status))
    return 0


def _watch(client: Any, args: argparse.Namespace) -> int:
    stream = client.watch_mesh()
    out = make_console()
    try:
        if args.json:
            for message in stream:
                print_json(status_dict(message))
        elif out.is_terminal:
            from rich.live import Live

            with Live(console=out, auto_refresh=False) as live:
                for message in stream:
                    live.update(status_renderable(status_dict(message)), refresh=True)
        else:  # a log: one drawing per change
            for message in stream:
                out.print(status_renderable(status_dict(message)))
                out.print()
    except KeyboardInterrupt:
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            cancel()
        return 0
    raise CliError(f"{args.admin} closed the watch stream (server stopped?)")


def verify_dict(result: Any) -> dict[str, Any]:
    """A pb.VerifyExpertsResult as a plain dict."""
    return {
        "epoch": result.epoch,
        "slots_checked": result.slots_checked,
        "mismatches": [
            {
                "layer": m.layer,
                "slot": m.slot,
                "device_id": m.device_id,
                "expected_expert": m.expected_expert,
                "found_expert": m.found_expert,
            }
            for m in result.mismatches
        ],
        "slots_repaired": result.slots_repaired,
        "verify_ms": result.verify_ms,
    }


def _verify(client: Any, args: argparse.Namespace) -> int:
    report = verify_dict(client.verify_experts(check_only=args.check_only))
    if args.json:
        print_json(report)
    else:
        out = make_console()
        wrong = report["mismatches"]
        out.print(
            f"epoch {report['epoch']}: {report['slots_checked']} expert slots checked in "
            f"{report['verify_ms']:.1f} ms, {len(wrong)} wrong"
            + (f", {report['slots_repaired']} rewritten from the host copy" if wrong else "")
        )
        for m in wrong:
            held = (
                f"expert {m['found_expert']}'s weights"
                if m["found_expert"] >= 0
                else "weights of no expert"
            )
            out.print(
                f"  layer {m['layer']} slot {m['slot']} (device {m['device_id']}): holds "
                f"{held}, should hold expert {m['expected_expert']}"
            )
    return 1 if report["mismatches"] else 0


def _print_result(result: Any, args: argparse.Namespace) -> int:
    if args.json:
        print_json(result_dict(result))
        return 0
    summary = result.summary
    if getattr(summary, "dry_run", False):
        title = f"dry run at epoch {result.epoch}: nothing changed; this would happen"
    else:
        title = f"now at epoch {result.epoch}"
    make_console().print(reconfiguration_table(summary, title=title))
    sys.stdout.flush()
    return 0
