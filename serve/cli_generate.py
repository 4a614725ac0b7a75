"""`elastic-moe generate`: one prompt, through a server (`--server`) or offline in-process.

Offline, the engine is driven directly (Engine + Coordinator + GuardedStepper + FaultInjector),
and `--inject-failure STEP:DEVICE` / `--inject-rejoin STEP:DEVICE` break and bring back devices
between engine steps: anyone can check that the tokens do not change.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from serve.cli_common import (
    CliError,
    build_engine,
    check_model_source,
    enable_compilation_cache,
    load_model,
    pick_devices,
    print_json,
    reconfiguration_dict,
    reconfiguration_line,
    rpc_errors,
)


def run_generate(args: argparse.Namespace) -> int:
    if args.server is not None:
        return _run_on_server(args)
    return _run_offline(args)


# ---- streaming text -------------------------------------------------------------------------
class TextStream:
    """Writes generated text to stdout as it comes (never half a character)."""

    def __init__(self, tokenizer: Any = None, prompt: list[int] = (), out=None):
        self.out = out or sys.stdout
        self.detokenizer = None
        if tokenizer is not None:
            from serve.text_stream import IncrementalDetokenizer

            self.detokenizer = IncrementalDetokenizer(tokenizer, prompt)

    def push(self, ids: list[int]) -> None:
        self.push_text(self.detokenizer.push(ids))

    def push_text(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        if self.detokenizer is not None:
            self.push_text(self.detokenizer.push([], final=True))
        self.out.write("\n")
        self.out.flush()


class TokenStream(TextStream):
    """Writes generated token ids (space-separated) as they come: `--tokens`."""

    def push(self, ids: list[int]) -> None:
        self.push_text("".join(f"{i} " for i in ids))


def _note(message: str) -> None:
    """Progress for a human, on stderr so stdout stays the generated text (or the JSON)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


# ---- offline ----------------------------------------------------------------------------------
@dataclass
class Injection:
    kind: str  # "failure" or "rejoin"
    step: int
    device: int
    fired: bool = False

    @property
    def flag(self) -> str:
        return f"--inject-{self.kind} {self.step}:{self.device}"


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


def _run_offline(args: argparse.Namespace) -> int:
    check_model_source(args.preset, args.checkpoint)
    enable_compilation_cache()
    from elastic_moe.coordinator import Coordinator
    from elastic_moe.faults import FaultInjector, GuardedStepper
    from elastic_moe.reconfiguration import ReconfigurationRefused, UnknownDevice
    from elastic_moe.requests import Request, RequestError, SamplingParams

    cfg, params, tokenizer = load_model(args.preset, args.checkpoint)
    prompt = _prompt_ids(args, tokenizer)
    devices = pick_devices(args.devices if args.devices is not None else 8)
    device_ids = [d.id for d in devices]
    plan = _injections(args, device_ids)
    redundant = args.redundant_experts
    if redundant is None:  # enough that any single loss (and most double ones) needs no copy
        redundant = cfg.num_experts if len(devices) > 1 else 0
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    request = Request(
        prompt, args.max_tokens, sampling, tuple(args.stop_token_ids), request_id="generate-0"
    )
    try:
        request.validate(cfg.vocab_size, cfg.max_seq_len)
    except RequestError as error:
        raise CliError(str(error)) from None

    engine = build_engine(
        cfg,
        params,
        devices,
        request_slots_per_device=args.request_slots_per_device,
        redundant=redundant,
    )
    coordinator = Coordinator(engine, standby=False)
    injector = FaultInjector()
    stepper = GuardedStepper(coordinator, injector)
    engine.submit(request)

    stream = None
    if not args.json:
        stream = TokenStream() if args.tokens else TextStream(tokenizer, prompt)
    reconfigurations: list[dict[str, Any]] = []
    started = time.perf_counter()
    step = 0
    try:
        while not request.done:
            for injection in plan:
                if injection.step == step and not injection.fired:
                    injection.fired = True
                    if injection.kind == "failure":
                        injector.break_devices([injection.device])
                    else:
                        injector.repair_devices([injection.device])
                        _record(
                            reconfigurations,
                            coordinator.rejoin([injection.device]),
                            step,
                            quiet=stream is None,
                        )
            seen = len(coordinator.history)
            events = stepper.step()
            for summary in coordinator.history[seen:]:
                _record(reconfigurations, summary, step, quiet=stream is None)
            if stream is not None and events:
                stream.push([e.token for e in events if e.request_id == request.request_id])
            step += 1
    except (ReconfigurationRefused, UnknownDevice) as error:
        if stream is not None:
            stream.close()
        raise CliError(f"at step {step}: {error}") from None
    finally:
        engine.executables.shutdown()
    elapsed = time.perf_counter() - started
    for injection in plan:
        if not injection.fired:
            _note(f"note: {injection.flag} never fired: the request finished after {step} steps")

    if stream is not None:
        stream.close()
        _note(
            f"[{len(request.generated)} tokens, finish: {request.finish_reason.value}, "
            f"{step} steps in {elapsed:.2f} s on {len(devices)} devices, epoch "
            f"{engine.mesh.epoch}, {len(reconfigurations)} reconfigurations, "
            f"{request.reprefills} re-prefills]"
        )
        return 0
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
            "steps": step,
            "elapsed_s": elapsed,
            "final_epoch": engine.mesh.epoch,
            "serving_devices": [d.id for d in engine.mesh.devices],
            "reconfigurations": reconfigurations,
            "injections": [
                {"kind": i.kind, "step": i.step, "device": i.device, "fired": i.fired} for i in plan
            ],
        }
    )
    return 0


def _record(out: list[dict[str, Any]], summary: Any, step: int, quiet: bool = False) -> None:
    out.append({"step": step, **reconfiguration_dict(summary)})
    if not quiet:
        _note(f"\n[step {step}] {reconfiguration_line(summary)}")


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    if args.prompt_tokens is not None:
        return list(args.prompt_tokens)
    if args.prompt == "":
        raise CliError("--prompt is empty")
    try:
        return tokenizer.encode(args.prompt)
    except ValueError as error:
        raise CliError(f"cannot tokenize --prompt: {error}") from None


# ---- through a server -----------------------------------------------------------------------
def _run_on_server(args: argparse.Namespace) -> int:
    from serve.client import Client

    prompt: str | list[int] = args.prompt if args.prompt is not None else args.prompt_tokens
    if prompt == "":
        raise CliError("--prompt is empty")
    token_ids: list[int] = []
    logprobs: list[float] = []
    epochs: list[int] = []
    text_parts: list[str] = []
    complete = None
    request_id = ""
    started = time.perf_counter()
    out = None if args.json else (TokenStream() if args.tokens else TextStream())
    with rpc_errors(args.server):
        client = Client(target=args.server, timeout=args.timeout)
        try:
            stream = client.generate_stream(
                prompt,
                args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop_token_ids=list(args.stop_token_ids),
            )
            for response in stream:
                request_id = response.request_id or request_id
                if response.HasField("chunk"):
                    chunk = response.chunk
                    token_ids += list(chunk.token_ids)
                    logprobs += list(chunk.logprobs)
                    epochs += [int(chunk.mesh_epoch)] * len(chunk.token_ids)
                    text_parts.append(chunk.text)
                    if isinstance(out, TokenStream):
                        out.push(list(chunk.token_ids))
                    elif out is not None:
                        out.push_text(chunk.text)
                elif response.HasField("complete"):
                    complete = response.complete
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()
    elapsed = time.perf_counter() - started
    if complete is None:
        raise CliError(f"{args.server} ended the stream without completing the request")
    from serve.proto import elastic_moe_pb2 as pb

    finish = pb.FinishReason.Name(complete.finish_reason).lower()
    if out is not None:
        out.close()
        _note(
            f"[{len(token_ids)} tokens, finish: {finish}, {elapsed:.2f} s, epochs "
            f"{sorted(set(epochs))}, {complete.reprefills} re-prefills, ttft "
            f"{complete.ttft_ms:.1f} ms]"
        )
        return 0 if finish != "aborted" else 1
    print_json(
        {
            "request_id": request_id,
            "mode": "server",
            "server": args.server,
            "token_ids": token_ids,
            "logprobs": logprobs,
            "text": "".join(text_parts),
            "finish_reason": finish,
            "prompt_tokens": complete.prompt_tokens,
            "completion_tokens": complete.completion_tokens,
            "reprefills": complete.reprefills,
            "epochs": epochs,
            "ttft_ms": complete.ttft_ms,
            "elapsed_s": elapsed,
        }
    )
    return 0 if finish != "aborted" else 1
