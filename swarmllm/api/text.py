"""Generated tokens to text deltas: holds back incomplete characters and possible stop
sequences, and cuts the text before the first stop sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """``push`` a token, get the text that became final; ``stopped`` once a stop sequence shows."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode, self._stop = decode, tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # all final text so far (what the client has been sent)
        self.stopped = False

    def push(self, token: int) -> str:
        """The new final text after ``token``."""
        if self.stopped:
            raise RuntimeError("the text already stopped")
        self.tokens.append(token)
        full = self._decode(self.tokens)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        final = len(full)
        if full.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            final -= 1
        final -= self._partial_stop(full[:final])
        return self._advance(full[:final])

    def flush(self) -> str:
        """At the end: whatever was held back, unless it was a stop sequence."""
        if self.stopped or not self.tokens:
            return ""
        full = self._decode(self.tokens)
        return self._advance(full)

    def _advance(self, final: str) -> str:
        if not final.startswith(self.text) or len(final) <= len(self.text):
            return ""  # decoding changed earlier text (rare); keep what was sent
        delta, self.text = final[len(self.text) :], final
        return delta

    def _first_stop(self, full: str) -> int | None:
        # only text not yet sent can hold a new stop sequence (plus a stop's length before it)
        longest = max((len(s) for s in self._stop), default=0)
        start = max(0, len(self.text) - longest)
        found = [i for s in self._stop if (i := full.find(s, start)) >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop sequence."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
