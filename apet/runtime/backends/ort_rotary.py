"""The export's rotary embedding as a position-indexed table: what ``GroupQueryAttention`` (com.microsoft) needs to
rotate q and k itself (``do_rotary`` with ``cos_cache``/``sin_cache`` and ``position_ids``) instead of two
``RotaryEmbedding`` nodes per layer before it (:mod:`.ort_gqa`, the optional rewrite ``gqa-rotary``).

The exported graph computes each call's cos/sin from its positions: ``positions`` → ``Unsqueeze`` (last axis) →
``Cast`` to float32 → ``× inv_freq`` → ``Concat(f, f)`` → ``Cos``/``Sin`` → ``Cast`` to the model's dtype →
``Slice`` of the first half (what ``RotaryEmbedding`` reads). Since the concatenated halves are equal, that is
``cos(p · inv_freq)``: the table holds it for every position below the cache's capacity, computed here in float32 as
the graph computes it (numpy's cos may differ from the device's by an ulp of float32 before the cast to float16).
A chain of any other form (scaled rotary, M-RoPE's sections) is not matched: the caller keeps the rotary nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from apet.runtime.backends.ort_graph_edit import attributes, constant_values

_FLOAT_TYPES = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}  # the tables numpy can hold


@dataclass(frozen=True)
class RotaryTable:
    """One rotary input (cos or sin) as a table: the positions tensor it was computed from, and its values."""

    positions: str  # int64 [B, T]
    table: np.ndarray  # [capacity, D/2] in the graph's dtype


class RotaryChains:
    """Matches the chains of one graph; ``constants`` read once (the inv_freq vectors are small)."""

    def __init__(self, graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto]) -> None:
        self.producers = producers
        self.constants = constant_values(graph, max_elements=4096)

    def _node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def table(self, name: str, capacity: int) -> RotaryTable | None:
        """The table of rotary input ``name`` (a ``RotaryEmbedding``'s cos or sin) for positions 0..capacity-1, or
        None where its chain is not the one the module's docstring describes."""
        half = self._node(name, "Slice")
        if half is None or len(half.input) < 3 or half.input[1] not in self.constants \
                or np.ravel(self.constants[half.input[1]]).tolist() != [0]:
            return None
        dtype, source = np.float32, half.input[0]
        cast = self._node(source, "Cast")
        if cast is not None:
            dtype = _FLOAT_TYPES.get(int(attributes(cast)["to"]))
            source = cast.input[0]
        wave = self.producers.get(source)
        if dtype is None or wave is None or wave.op_type not in ("Cos", "Sin"):
            return None
        doubled = self._node(wave.input[0], "Concat")
        if doubled is None or len(doubled.input) != 2 or doubled.input[0] != doubled.input[1] \
                or attributes(doubled).get("axis") not in (-1, 2):
            return None
        product = self._node(doubled.input[0], "Mul")
        if product is None:
            return None
        frequencies = [n for n in product.input if n in self.constants]
        angles = [n for n in product.input if n not in self.constants]
        if len(frequencies) != 1 or len(angles) != 1:
            return None
        inv_freq = np.asarray(self.constants[frequencies[0]], dtype=np.float32).reshape(-1)
        to_float = self._node(angles[0], "Cast")
        if to_float is None or attributes(to_float)["to"] != TensorProto.FLOAT:
            return None
        expand = self._node(to_float.input[0], "Unsqueeze")
        axes = self.constants.get(expand.input[1]) if expand is not None and len(expand.input) > 1 else None
        if expand is None or axes is None or np.ravel(axes).tolist() not in ([-1], [2]):
            return None
        positions = np.arange(capacity, dtype=np.float32)[:, None]
        values = (np.cos if wave.op_type == "Cos" else np.sin)(positions * inv_freq[None, :])
        return RotaryTable(expand.input[0], values.astype(dtype))
