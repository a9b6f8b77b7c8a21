"""Incremental detokenization for streaming: text deltas that never split a multi-byte character,
and stop strings found across token boundaries."""

from __future__ import annotations

from router.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    A delta is released only when the decoded text does not end in an incomplete character, so a
    character spread over several byte tokens arrives whole. Only a window of recent tokens is
    decoded each time, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.decoded = ""  # all complete text so far
        self.text = ""  # the part released to the client: never contains, nor ends inside, a stop string
        self._prefix_offset = 0  # tokens before this are never decoded again
        self._read_offset = 0  # tokens before this are part of `decoded`
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly releasable text (maybe empty)."""
        self.token_ids.append(token_id)
        prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return self._release(full[len(prefix):], final=False)

    def flush(self) -> str:
        """At the end: text held back as a possible stop-string start, and any incomplete tail."""
        if self.stopped:
            return ""
        prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return self._release(full[len(prefix):], final=True)

    def _release(self, delta: str, final: bool) -> str:
        if self.stopped:
            return ""
        searched_from = max(0, len(self.decoded) - max((len(s) for s in self.stop), default=0))
        self.decoded += delta
        hits = [at for at in (self.decoded.find(stop, searched_from) for stop in self.stop) if at != -1]
        if hits:
            self.stopped = True
            return self._advance(self.decoded[:min(hits)])
        held = 0 if final else self._held_back()
        return self._advance(self.decoded[:len(self.decoded) - held])

    def _held_back(self) -> int:
        """Length of the longest tail of `decoded` that could be the start of a stop string."""
        tails = [n for stop in self.stop for n in range(min(len(stop) - 1, len(self.decoded)), 0, -1)
                 if self.decoded.endswith(stop[:n])]
        return max(tails, default=0)

    def _advance(self, releasable: str) -> str:
        delta = releasable[len(self.text):]
        self.text = releasable
        return delta
