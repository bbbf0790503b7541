"""Streaming that never shows a stop string: text that could still turn out to start one is held back, so the
streamed deltas always add up to the final answer (which ends before the stop string, as OpenAI's does)."""

from __future__ import annotations


class StopHoldback:
    """Passes streamed text through, except a tail that may be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """The part of ``delta`` (and of earlier held-back text) that is safe to show now."""
        if self.stopped:
            return ""
        self.text += delta
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        if hits:
            safe, self.stopped = min(hits), True
        else:
            safe = len(self.text) - max((_overlap(self.text, s) for s in self.stops), default=0)
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self, final_text: str) -> str:
        """What remains of the final answer once the stream ended (held-back text, the decoder's flush)."""
        sent = self.text[: self.emitted]
        return final_text[len(sent):] if final_text.startswith(sent) else ""


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
