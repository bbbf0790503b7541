"""The prompt's embeddings assembled on the device: the visual rows the vision graph left there and the text rows of
the embedding table, copied into the buffer the prefill reads, without the visual rows travelling to the host and
back.

Why: the host splice (:func:`~apet.runtime.backends.base.splice_numpy`) downloads the visual embeddings after the
vision run, gathers the whole prompt from the table and uploads it, two pageable copies around every first token
(LLaVA-1.5-7B: 96 × 4096 float16 rows down, 136 rows up). Here only the text rows go up, gathered on the host as
before, and a two-node graph (``Concat`` of the visual and text rows, ``Gather`` by each slot's source row) writes
the prompt where the prefill's bound input lies. Both are copies of the same bytes, so the prompt is bit-identical
to the host splice's (tested). The table stays on the host: a second copy on the device would cost its size
(0.26 GB for LLaVA-1.5, 0.6 GB for Qwen2.5-VL-3B) on a Jetson's shared memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from onnx import TensorProto, helper

VISUAL, TEXT, SOURCE, PROMPT = "visual_rows", "text_rows", "source_row", "inputs_embeds"
OPSET = 17
_NUMPY_TYPES = {"tensor(float16)": np.dtype(np.float16), "tensor(float)": np.dtype(np.float32),
                "tensor(double)": np.dtype(np.float64)}


class DeviceRows:
    """A vision output left on the device (the graphed vision's bound output buffer), read on the host only when
    someone asks (``numpy()``, ``np.asarray``). The buffer is rewritten by the next vision run, so the owner calls
    :meth:`materialize` first while this object is alive: its values never change under a holder."""

    def __init__(self, value: Any) -> None:
        self._value: Any = value  # an OrtValue on the device, until materialized
        self._host: np.ndarray | None = None
        self.shape = tuple(int(d) for d in value.shape())
        self.dtype = _NUMPY_TYPES.get(value.data_type(), np.dtype(object))  # object: a type numpy lacks (bfloat16)

    @property
    def on_device(self) -> Any:
        """The device OrtValue, or None once the values were copied to the host."""
        return self._value

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def materialize(self) -> None:
        """Copy to the host and let the device buffer go (its next run will overwrite it)."""
        if self._host is None:
            self._host = np.array(self._value.numpy(), copy=True)  # a host OrtValue's numpy() shares its buffer
            self._value = None

    def numpy(self) -> np.ndarray:
        if self._host is None:
            return self._value.numpy()
        return self._host

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        return self.numpy().reshape(*shape)


class HandedOut:
    """The :class:`DeviceRows` a bound run handed out last, materialized before the run writes its buffers again."""

    def __init__(self) -> None:
        self._last: list[Callable[[], DeviceRows | None]] = []

    def hand_out(self, value: Any) -> DeviceRows:
        rows = DeviceRows(value)
        self._last.append(weakref.ref(rows))
        return rows

    def before_run(self) -> None:
        for held in (ref() for ref in self._last):
            if held is not None:
                held.materialize()
        self._last = []


@dataclass(frozen=True)
class SplicedEmbeds:
    """The prompt's embeddings [B, L, H], made on the device at whatever buffer the prefill binds (``write``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    write: Callable[[Any], None]  # OrtValue of ``shape`` on the device -> filled with the prompt


def bind_input(binding: Any, name: str, value: Any, device_type: str) -> Any:
    """Bind a host array, or fill a fresh device buffer with :class:`SplicedEmbeds` and bind that (returned: it
    must outlive the run)."""
    if not isinstance(value, SplicedEmbeds):
        binding.bind_cpu_input(name, value)
        return None
    import onnxruntime as ort

    buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(value.shape), value.dtype.type, device_type, 0)
    value.write(buffer)
    binding.bind_ortvalue_input(name, buffer)
    return buffer


def splice_model(hidden: int, dtype: np.dtype) -> bytes:
    """The two-node splice graph: rows of ``concat(visual [N, H], text [M, H])`` gathered by ``source`` [B, L]."""
    kind = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Concat", [VISUAL, TEXT], ["rows"], axis=0),
         helper.make_node("Gather", ["rows", SOURCE], [PROMPT], axis=0)],
        "apet_device_splice",
        [helper.make_tensor_value_info(VISUAL, kind, ["visual", hidden]),
         helper.make_tensor_value_info(TEXT, kind, ["text", hidden]),
         helper.make_tensor_value_info(SOURCE, TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info(PROMPT, kind, ["batch", "length", hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # every ONNX Runtime the project supports (>= 1.18) reads it
    return model.SerializeToString()


def sources(token_ids: np.ndarray, visual_rows: np.ndarray, visual_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slot, the row of ``concat(visual, text)`` it copies (a visual slot its visual row, a text slot
    ``visual_count`` + its place among the text slots), and the text slots' token ids in that order."""
    source = np.asarray(visual_rows, dtype=np.int64).copy()
    text = source < 0
    source[text] = visual_count + np.arange(int(text.sum()), dtype=np.int64)
    return source, np.asarray(token_ids)[text]


class DeviceSplice:
    """Builds the prompt on the device for a prefill whose visual rows are :class:`DeviceRows` (one small session,
    no CUDA graph: its shapes follow the prompt)."""

    def __init__(self, setup: Any, table: np.ndarray) -> None:
        self.setup, self.table = setup, table
        self.session = setup.session(splice_model(int(table.shape[-1]), table.dtype))

    def applies(self, visual: Any, visual_rows: np.ndarray) -> bool:
        """Visual rows still on the device, of the table's type, and at least one visual slot (a prompt of text
        only has nothing to splice)."""
        return (isinstance(visual, DeviceRows) and visual.on_device is not None and visual.dtype == self.table.dtype
                and visual.shape[-1] == self.table.shape[-1] and bool((np.asarray(visual_rows) >= 0).any()))

    def __call__(self, token_ids: np.ndarray, visual_rows: np.ndarray, visual: DeviceRows) -> SplicedEmbeds:
        count = int(np.prod(visual.shape[:-1]))
        source, text_ids = sources(token_ids, visual_rows, count)
        text = np.ascontiguousarray(self.table[text_ids])
        flat = visual.on_device
        hidden = int(self.table.shape[-1])

        def write(target: Any) -> None:
            binding = self.session.io_binding()
            # the visual rows flat, [N, H]: the same bytes bound by address at the shape the graph reads
            binding.bind_input(VISUAL, flat.device_name().lower(), 0, self.table.dtype, [count, hidden],
                               flat.data_ptr())
            binding.bind_cpu_input(TEXT, text)
            binding.bind_cpu_input(SOURCE, source)
            binding.bind_ortvalue_output(PROMPT, target)
            self.session.run_with_iobinding(binding)

        return SplicedEmbeds(tuple(source.shape) + (hidden,), self.table.dtype, write)
