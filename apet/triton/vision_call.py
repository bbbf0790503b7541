"""The seam between apet's runtime and Triton's vision model: the pipeline's vision step as a function.

Inside Triton the generation model does not run the vision graph itself: ``route_vision`` makes its backend send
each vision run to the vision model through BLS (``bls_vision``), so vision encoding is batched across requests
and scaled by the vision model's own instance group (docs/triton.md). Tests route it through any callable.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import numpy as np

from apet.manifest import GraphEntry
from apet.runtime.backends.base import Backend, VisionOutput

VisionCall = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # vision inputs -> outputs, by name


def route_vision(backend: Backend, call: VisionCall, graph: GraphEntry) -> None:
    """Make ``backend`` run its vision graph through ``call``: the outputs by their names
    (:mod:`apet.contracts.io`), as numpy arrays, which every backend's prefill accepts (it splices on the
    host)."""

    def encode(arrays: dict[str, np.ndarray]) -> VisionOutput:
        return VisionOutput.of({name: np.asarray(value) for name, value in call(arrays).items()})

    backend._encode = encode  # type: ignore[method-assign]  # the one step that changes; checks stay the base's


def bls_vision(pb: ModuleType, model_name: str, graph: GraphEntry) -> VisionCall:
    """A BLS call of the vision model ``model_name``: inputs cast to the graph's declared dtypes (fp16 graphs
    take fp16 pixels), an error response raised as Triton's exception with the vision model's message."""
    dtypes = {spec["name"]: np.dtype(spec["dtype"]) for spec in graph.inputs}
    names = [spec["name"] for spec in graph.outputs]

    def call(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [pb.Tensor(name, np.ascontiguousarray(value, dtype=dtypes.get(name, value.dtype)))
                  for name, value in arrays.items()]
        response = pb.InferenceRequest(model_name=model_name, requested_output_names=names, inputs=inputs).exec()
        if response.has_error():
            raise pb.TritonModelException(f"the vision model {model_name} failed: {response.error().message()}")
        return {name: pb.get_output_tensor_by_name(response, name).as_numpy() for name in names}

    return call
