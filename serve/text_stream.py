"""Streaming detokenization: the text each new token adds, never half a character.

A token may end in the middle of a multi-byte UTF-8 character (byte tokens, byte-level BPE), and
some tokenizers decode a token differently depending on what precedes it (SentencePiece's leading
space). So the text of new tokens is the difference between two decodes of a short window of ids
that starts a few tokens back (the approach of Hugging Face TGI and vLLM), and a delta that ends
in U+FFFD (an incomplete character) is held back until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept in the window so the first token decodes in context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int] = ()):
        self.tokenizer = tokenizer
        context = [int(t) for t in prompt[-PROMPT_CONTEXT:]]
        if REPLACEMENT in tokenizer.decode(context):
            context = []  # a prompt cut mid-character would swallow the first token's text
        self.ids = context
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # ids before this have had their text emitted

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Adds generated tokens; returns the new text (held back if it ends mid-character).

        With final=True whatever is held back is released."""
        self.ids.extend(int(t) for t in token_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith(REPLACEMENT) and not final):
            return ""
        delta = text[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta
