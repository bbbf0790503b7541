"""The KV-cache layout after ApET's second stage: one home for every per-layer length.

Layers before the stage-2 layer L hold the whole sequence; layers from L on hold it minus the R
tokens stage 2 removed (R = K1 - K2). Profiles, trtexec lines, the TensorRT backend's binding
shapes, the static torch decoder and the benchmarks all ask this object.
"""

from __future__ import annotations

from dataclasses import dataclass

from apet.contracts.io import INJECTED_DIM

DEFAULT_TEXT_TOKENS = 512  # prompt text budget on top of the visual tokens (default contexts and prefill profiles)


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    stage2_layer: int | None = None  # None: one stage, every layer holds the whole sequence
    removed: int = 0  # tokens removed at stage 2

    @classmethod
    def of(cls, num_layers: int, plan) -> "CacheLayout":
        """From a :class:`apet.contracts.plan.CompressionPlan` (or anything with ``stage2``, ``removed_at_stage2``)."""
        stage2 = plan.stage2
        return cls(num_layers, None if stage2 is None else stage2.layer, plan.removed_at_stage2)

    def shortened(self, layer: int) -> bool:
        return self.stage2_layer is not None and layer >= self.stage2_layer

    def past_length(self, layer: int, past: int) -> int:
        """Cache length of ``layer`` when the full sequence so far has ``past`` tokens (0 = before prefill)."""
        return past - self.removed if self.shortened(layer) and past > 0 else past

    def present_length(self, layer: int, past: int, seq: int) -> int:
        """Cache length after a step of ``seq`` new tokens (a prefill is the step with past 0)."""
        if self.shortened(layer):
            return seq - self.removed if past == 0 else past - self.removed + seq
        return past + seq

    def capacity(self, layer: int, max_context: int) -> int:
        """Preallocated cache positions of ``layer`` for a context of ``max_context`` tokens."""
        return max_context - self.removed if self.shortened(layer) else max_context

    def lengths(self, past: int) -> list[int]:
        return [self.past_length(i, past) for i in range(self.num_layers)]

    def dims(self, batch: int, seq: int, past: int, rows: int = 0) -> dict[str, int]:
        """Values of the LLM graph's symbolic dims for one step (see ``export/llm.py``'s dynamic axes); ``rows``:
        the visual rows of the injected per-layer inputs (families that declare them; 0 at decode)."""
        layer = self.stage2_layer if self.stage2_layer is not None else 0
        return {"batch": batch, "seq": seq, "seq_out": seq, "past": past, "total": past + seq,
                "past_after": self.past_length(layer, past), "total_after": self.present_length(layer, past, seq),
                INJECTED_DIM: rows}
