"""Which part of a choice's text may be sent now: UTF-8 hold-back and the stop-string scan.

Pure and synchronous (no I/O): the generation loop detokenizes the generated ids and hands the
whole text so far to `TextRelease`, which remembers how much was released and how far the text
was scanned. vLLM's semantics:

- a trailing "\\ufffd" (an incomplete UTF-8 character: its next byte token may complete it) is
  held back;
- unless the stop string itself is to be output (`include_stop_str_in_output`), a suffix that
  may be the start of a stop string is held back too;
- a stop string found in the new part of the text ends the choice: the text is cut before it
  (after it with `include_stop_str_in_output`), never before what was already released.
"""

from __future__ import annotations

from collections.abc import Sequence


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextRelease:
    """The text state of one choice: `released` characters sent so far."""

    __slots__ = ("_longest", "include_stop", "released", "scanned", "stops")

    def __init__(self, stops: Sequence[str] = (), *, include_stop: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_stop = include_stop
        self._longest = max((len(s) for s in self.stops), default=0)
        self.released = 0  # characters of text already sent
        self.scanned = 0  # text before this offset holds no stop string

    def find_stop(self, text: str, floor: int = 0) -> tuple[int, str] | None:
        """The earliest stop string in the new part of `text`: (where the text ends, it).
        Only a stop string that ends after `floor` counts (vLLM's min_tokens: the text of the
        first min_tokens tokens cannot complete one)."""
        if not self.stops:
            return None
        start = max(0, self.scanned - self._longest + 1)
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = text.find(stop, max(start, floor - len(stop) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        # A trailing U+FFFD may still become another character: scan it again next time.
        self.scanned = len(text.rstrip("\ufffd"))
        if best is None:
            return None
        at, stop = best
        cut = at + len(stop) if self.include_stop else at
        return max(cut, self.released), stop

    def release(self, text: str) -> str:
        """The text that can be sent now: all but a trailing incomplete UTF-8 character and,
        unless the stop string itself is to be output, a suffix that may start a stop string."""
        safe = text.rstrip("\ufffd")
        if self.stops and not self.include_stop:
            safe = safe[: len(safe) - held_back(safe, self.stops)]
        if len(safe) <= self.released:
            return ""
        released, self.released = safe[self.released :], len(safe)
        return released

    def flush(self, text: str) -> str:
        """Everything of `text` not sent yet (the choice has finished)."""
        rest, self.released = text[self.released :], len(text)
        return rest
