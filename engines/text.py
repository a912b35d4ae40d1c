"""Turning a stream of token ids into a stream of safe text.

Two things are held back rather than sent: the bytes of a character that a later
token will finish (byte-level BPE splits Chinese and emoji across tokens), and a tail
that might be the start of a stop string.  Everything sent is whole characters, and
nothing after a stop string is ever sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token list, returning only newly completed characters.

    Decoding a window that starts a few tokens back (``prefix_offset``) keeps the
    tokenizer's spacing rules right without re-decoding the whole sequence each step.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: what is still held, less a character left unfinished.

        Generation can stop (length, stop, cancel) between the tokens of one character;
        its bytes decode to U+FFFD, which would reach the client as noise, so they are dropped.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)


class StopStringFilter:
    """Cuts the text before the first stop string and holds back possible starts of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self._pending = self._pending[:cut], ""
            return out, True
        hold = self._longest_partial_stop_suffix()
        split = len(self._pending) - hold
        out, self._pending = self._pending[:split], self._pending[split:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _longest_partial_stop_suffix(self) -> int:
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
