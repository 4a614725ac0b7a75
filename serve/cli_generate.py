"""`elastic-moe generate`: one prompt, through a server (`--server`) or offline in-process
(serve/cli_offline.py, where faults can be injected), and how its output reaches the terminal.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from serve.cli_common import CliError, print_json, printable, rpc_errors


def run_generate(args: argparse.Namespace) -> int:
    if args.server is not None:
        return _run_on_server(args)
    from serve.cli_offline import run_offline

    return run_offline(args)


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
            self.out.write(printable(text))  # a model's text may hold any control character
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


def note(message: str) -> None:
    """Progress for a human, on stderr so stdout stays the generated text (or the JSON)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


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
        note(
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
