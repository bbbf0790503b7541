"""Token ids back to streamed text (the prompt side lives in :mod:`apet.models.prompt`)."""

from __future__ import annotations

from apet.models.prompt import PromptEncoder


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self.encoder = encoder
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.encoder.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    @property
    def text(self) -> str:
        return self.encoder.decode(self.ids)
