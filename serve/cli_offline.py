"""`elastic-moe generate` offline: one request on an engine in this process, with faults.

The engine is driven directly (Engine + Coordinator + GuardedStepper + FaultInjector), and
`--inject-failure STEP:DEVICE` / `--inject-rejoin STEP:DEVICE` break and bring back devices
between engine steps. With faults injected (or `--compare`) the same request then runs again on
a fresh engine without faults, and the run reports whether the tokens are equal: the claim
anyone can check.

Steps count from 0. Step 0 prefills the prompt and decodes once (tokens 0 and 1); each later
step decodes one token; a step that fails (a broken device) makes none, and the step that
re-prefills the request makes two again.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from serve.cli_common import (
    CliError,
    build_engine,
    check_model_source,
    enable_compilation_cache,
    load_model,
    make_console,
    pick_devices,
    print_json,
    reconfiguration_dict,
    reconfiguration_line,
)
from serve.cli_generate import TextStream, TokenStream, note


@dataclass
class Injection:
    kind: str  # "failure" or "rejoin"
    step: int
    device: int
    fired: bool = False

    @property
    def flag(self) -> str:
        return f"--inject-{self.kind} {self.step}:{self.device}"


@dataclass
class Run:
    """What the run with faults did."""

    steps: int = 0
    elapsed_s: float = 0.0
    final_epoch: int = 0
    serving_devices: list[int] = field(default_factory=list)
    reconfigurations: list[dict[str, Any]] = field(default_factory=list)


def _injections(args: argparse.Namespace, device_ids: list[int]) -> list[Injection]:
    plan = [Injection("failure", s, d) for s, d in args.inject_failure]
    plan += [Injection("rejoin", s, d) for s, d in args.inject_rejoin]
    for injection in plan:
        if injection.device not in device_ids:
            raise CliError(
                f"{injection.flag}: unknown device {injection.device}; this run uses devices "
                f"{device_ids}"
            )
    # Failures before rejoins at the same step; otherwise in the order given.
    return sorted(plan, key=lambda i: (i.step, i.kind != "failure"))


def _progress(console):
    """A spinner per phase on stderr, gone once the text starts; nothing when stderr is not a
    terminal (a log or a pipe), so that errors stay one line."""
    if not console.is_terminal:
        return contextlib.nullcontext(None)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    # stdout stays the generated text: only stderr (notes) is routed around the display.
    return Progress(*columns, console=console, transient=True, redirect_stdout=False)


class _Phases:
    """Marks the phases of a Progress (or of nothing) done one after the other."""

    def __init__(self, progress):
        self.progress, self.task = progress, None

    def start(self, description: str) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.update(self.task, completed=1)
        self.task = self.progress.add_task(description, total=1)


def run_offline(args: argparse.Namespace) -> int:
    check_model_source(args.preset, args.checkpoint)
    enable_compilation_cache()
    from elastic_moe.requests import Request, RequestError, SamplingParams

    devices = pick_devices(args.devices if args.devices is not None else 8)
    device_ids = [d.id for d in devices]
    plan = _injections(args, device_ids)
    compare = args.compare if args.compare is not None else bool(plan)
    console = make_console(stderr=True)
    with _progress(console) as progress:
        phases = _Phases(progress)
        phases.start(f"loading {args.preset or args.checkpoint}")
        cfg, params, tokenizer = load_model(args.preset, args.checkpoint)
        prompt = _prompt_ids(args, tokenizer)
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)

        def new_request() -> Request:
            stop = tuple(args.stop_token_ids)
            return Request(prompt, args.max_tokens, sampling, stop, request_id="generate-0")

        request = new_request()
        try:
            request.validate(cfg.vocab_size, cfg.max_seq_len)
        except RequestError as error:
            raise CliError(str(error)) from None
        redundant = args.redundant_experts
        if redundant is None:  # enough that any single loss (and most double ones) needs no copy
            redundant = cfg.num_experts if len(devices) > 1 else 0
        phases.start(
            f"deploying on {len(devices)} {devices[0].platform} devices "
            f"({cfg.num_experts} experts + {redundant} redundant slots)"
        )

        def new_engine():
            return build_engine(
                cfg,
                params,
                devices,
                request_slots_per_device=args.request_slots_per_device,
                redundant=redundant,
                placement=args.placement,
                numerics=args.numerics,
                layers_per_program=args.layers_per_program,
                # Step by step: --inject-failure/--inject-rejoin name steps, each 1 token.
                overlap_steps=False,
            )

        engine = new_engine()
        phases.start("compiling and running the first step (prefill and decode)")
        stream = None
        if not args.json:
            stream = TokenStream() if args.tokens else TextStream(tokenizer, prompt)
        run = _run_with_faults(engine, request, plan, stream, progress)
        del engine  # its device memory goes before the reference run takes its own

    for injection in plan:
        if not injection.fired:
            note(
                f"note: {injection.flag} never fired: the request finished after {run.steps} "
                f"steps (0 to {run.steps - 1}; step 0 makes 2 tokens, each later step 1)"
            )
    if stream is not None:
        stream.close()
        note(_summary(request, run, len(devices)))

    reference = None
    if compare:
        with _progress(console) as progress:
            _Phases(progress).start("comparing: the same request on a fresh engine, no faults")
            reference = _run_without_faults(new_engine(), new_request())
        equal = reference.generated == request.generated
        if stream is not None:
            note(f"[compare] a failure-free run of the same request: tokens equal: {_yes(equal)}")
            if not equal:
                note(f"[compare] first difference at token {_first_difference(request, reference)}")

    if args.json:
        print_json(
            {
                "request_id": request.request_id,
                "mode": "offline",
                "model": cfg.name,
                "devices": device_ids,
                "redundant_experts": redundant,
                "prompt_token_ids": prompt,
                "token_ids": list(request.generated),
                "logprobs": list(request.logprobs),
                "text": tokenizer.decode(list(request.generated)),
                "finish_reason": request.finish_reason.value,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(request.generated),
                "reprefills": request.reprefills,
                "epochs": list(request.epochs),
                "ttft_ms": request.ttft_ms,
                "steps": run.steps,
                "elapsed_s": run.elapsed_s,
                "final_epoch": run.final_epoch,
                "serving_devices": run.serving_devices,
                "reconfigurations": run.reconfigurations,
                "injections": [
                    {"kind": i.kind, "step": i.step, "device": i.device, "fired": i.fired}
                    for i in plan
                ],
                # null when no comparison ran; else whether the failure-free run's tokens equal
                "tokens_equal": None if reference is None else equal,
                "reference_token_ids": None if reference is None else list(reference.generated),
            }
        )
    return 1 if reference is not None and not equal else 0


def _run_with_faults(engine, request, plan: list[Injection], stream, progress) -> Run:
    """Steps the engine until the request is done, firing the injections before their steps;
    the first step's tokens wait until the progress display is gone."""
    from elastic_moe.coordinator import Coordinator
    from elastic_moe.faults import FaultInjector, GuardedStepper
    from elastic_moe.reconfiguration import ReconfigurationRefused, UnknownDevice

    run = Run()
    quiet = stream is None
    started = time.perf_counter()
    with Coordinator(engine, standby=False) as coordinator:
        injector = FaultInjector()
        stepper = GuardedStepper(coordinator, injector)
        engine.submit(request)
        held: list[int] = []  # tokens made while the progress display is up
        try:
            while not request.done:
                for injection in plan:
                    if injection.step == run.steps and not injection.fired:
                        injection.fired = True
                        if injection.kind == "failure":
                            injector.break_devices([injection.device])
                        else:
                            injector.repair_devices([injection.device])
                            result = coordinator.rejoin([injection.device])
                            _record(run, result, quiet)
                seen = len(coordinator.history)
                events = stepper.step()
                for summary in coordinator.history[seen:]:
                    _record(run, summary, quiet)
                held += [e.token for e in events if e.request_id == request.request_id]
                run.steps += 1
                if progress is not None and held:
                    progress.stop()  # the text starts: the spinner goes
                    progress = None
                if stream is not None and progress is None and held:
                    stream.push(held)
                    held = []
        except (ReconfigurationRefused, UnknownDevice) as error:
            if stream is not None:
                stream.close()
            raise CliError(f"at step {run.steps}: {error}") from None
        if stream is not None and held:
            stream.push(held)
    run.elapsed_s = time.perf_counter() - started
    run.final_epoch = engine.mesh.epoch
    run.serving_devices = [d.id for d in engine.mesh.devices]
    return run


def _run_without_faults(engine, request):
    """The reference: the same request on a fresh engine whose mesh never changes."""
    from elastic_moe.coordinator import Coordinator

    with Coordinator(engine, standby=False):
        engine.submit(request)
        while not request.done:
            engine.step()
    return request


def _record(run: Run, summary: Any, quiet: bool) -> None:
    run.reconfigurations.append({"step": run.steps, **reconfiguration_dict(summary)})
    if not quiet:
        note(f"\n[step {run.steps}] {reconfiguration_line(summary)}")


def _summary(request, run: Run, devices_at_start: int) -> str:
    devices_at_end = len(run.serving_devices)
    where = f"on {devices_at_start} devices"
    if devices_at_end != devices_at_start:
        where = f"started on {devices_at_start} devices and ended on {devices_at_end}"
    return (
        f"[{len(request.generated)} tokens, finish: {request.finish_reason.value}, "
        f"{run.steps} steps in {run.elapsed_s:.2f} s, {where}, epoch {run.final_epoch}, "
        f"{len(run.reconfigurations)} reconfigurations, {request.reprefills} re-prefills]"
    )


def _first_difference(request, reference) -> int:
    pairs = zip(request.generated, reference.generated, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), len(reference.generated))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    if args.prompt_tokens is not None:
        return list(args.prompt_tokens)
    if args.prompt == "":
        raise CliError("--prompt is empty")
    try:
        return tokenizer.encode(args.prompt)
    except ValueError as error:
        raise CliError(f"cannot tokenize --prompt: {error}") from None
