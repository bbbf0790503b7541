"""The ``config.pbtxt`` of each model in the repository, derived from the artifact's manifest (docs/triton.md).

The vision model's inputs and outputs are the vision graph's, as the manifest records them: when every one of
them starts with the symbolic ``batch`` dimension, Triton owns that dimension (``max_batch_size`` > 0, dims
without it, ``dynamic_batching`` on); otherwise (a graph whose first dimension is not the request batch) the
model is unbatched and the dims are the whole shapes. Symbolic dimensions become -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apet.errors import UsageError, option
from apet.manifest import GraphEntry, Manifest
from apet.triton.pbtxt import Enum

VISION_MODEL = "apet_vision"
GENERATION_MODEL = "apet_generate"
VISION_FORMS = ("tensorrt_plan", "onnxruntime_onnx", "python")
BATCH_DIM = "batch"
QUEUE_DELAY_US = 100  # how long a vision request waits for batch-mates: a frame's worth of nothing at 30 fps

# numpy dtype names in the manifest -> Triton's data types
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}

# the generation model's interface: what a client without apet sends and reads (name, type, dims, optional)
GENERATION_INPUTS = (("prompt", "TYPE_STRING", [1], False), ("image", "TYPE_STRING", [1], True),
                     ("video", "TYPE_STRING", [1], True), ("max_tokens", "TYPE_INT32", [1], True),
                     ("temperature", "TYPE_FP32", [1], True), ("top_p", "TYPE_FP32", [1], True),
                     ("seed", "TYPE_INT64", [1], True), ("stream", "TYPE_BOOL", [1], True))
GENERATION_OUTPUTS = (("text", "TYPE_STRING", [1]), ("token_ids", "TYPE_INT64", [-1]),
                      ("keep_index", "TYPE_INT64", [-1, -1]), ("prompt_tokens", "TYPE_INT64", [1]),
                      ("completion_tokens", "TYPE_INT64", [1]), ("finish_reason", "TYPE_STRING", [1]))


@dataclass(frozen=True)
class Scaling:
    """What ``apet triton --instances/--max-batch/--gpus`` set: instances per device, vision batch, devices."""

    instances: int = 1
    max_batch: int | None = None  # None: the artifact's max_batch
    gpus: tuple[int, ...] = ()  # empty: the kind's default (see instance_group)

    def check(self, manifest: Manifest) -> None:
        if self.instances < 1:
            raise UsageError(f"--instances {self.instances} must be at least 1", f"pass {option('instances', 1)}")
        if self.max_batch is not None and not 1 <= self.max_batch <= manifest.max_batch:
            raise UsageError(f"max batch {self.max_batch} is outside 1..{manifest.max_batch} (the artifact's graphs "
                             "and engines serve at most its export's --max-batch)",
                             f"pass {option('max_batch', manifest.max_batch)} or less, or re-export with a larger "
                             "--max-batch")
        if any(g < 0 for g in self.gpus):
            raise UsageError(f"GPU ids {list(self.gpus)} must be >= 0", "pass --gpus 0,1")


def batched(graph: GraphEntry) -> bool:
    """Whether every input and output of ``graph`` starts with the request batch dimension."""
    return all(spec["shape"] and spec["shape"][0] == BATCH_DIM for spec in graph.inputs + graph.outputs)


def tensor_config(spec: dict[str, Any], drop_batch: bool) -> dict[str, Any]:
    """One graph input/output as a Triton tensor: name, data type, dims (-1 for symbolic)."""
    if spec["dtype"] not in TRITON_TYPES:
        raise UsageError(f"the vision graph's {spec['name']} has dtype {spec['dtype']}, which Triton has no type for",
                         "re-export the artifact")
    shape = spec["shape"][1:] if drop_batch else spec["shape"]
    return {"name": spec["name"], "data_type": Enum(TRITON_TYPES[spec["dtype"]]),
            "dims": [d if isinstance(d, int) else -1 for d in shape]}


def instance_group(scaling: Scaling, gpu: bool) -> list[dict[str, Any]]:
    """``count`` instances on each listed GPU (Triton's meaning of count with gpus), or on the CPU."""
    if scaling.gpus:
        return [{"count": scaling.instances, "kind": Enum("KIND_GPU"), "gpus": list(scaling.gpus)}]
    return [{"count": scaling.instances, "kind": Enum("KIND_GPU" if gpu else "KIND_CPU")}]


def vision_config(manifest: Manifest, form: str, scaling: Scaling, parameters: dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """The vision model: the vision graph served by Triton's TensorRT or ONNX Runtime backend, or by apet's
    Python model (ONNX Runtime inside) where the ONNX Runtime backend is absent (pytriton, minimal images)."""
    if form not in VISION_FORMS:
        raise UsageError(f"vision form {form!r} is unknown", f"use one of {', '.join(VISION_FORMS)}")
    graph = manifest.graphs["vision"]
    is_batched = batched(graph)
    max_batch = (scaling.max_batch or manifest.max_batch) if is_batched else 0
    config: dict[str, Any] = {"name": VISION_MODEL}
    if form == "python":
        config["backend"] = "python"
    else:
        config["platform"] = form
    config["max_batch_size"] = max_batch
    config["input"] = [tensor_config(s, is_batched) for s in graph.inputs]
    config["output"] = [tensor_config(s, is_batched) for s in graph.outputs]
    if is_batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": QUEUE_DELAY_US}
    config["instance_group"] = instance_group(scaling, gpu=form == "tensorrt_plan")
    if parameters:
        config["parameters"] = [{"key": k, "value": {"string_value": v}} for k, v in parameters.items()]
    return config


def generation_config(scaling: Scaling, gpu: bool, parameters: dict[str, str]) -> dict[str, Any]:
    """The generation model: Python backend, decoupled (a request streams any number of responses)."""
    return {
        "name": GENERATION_MODEL,
        "backend": "python",
        "max_batch_size": 0,  # one request is one answer: the runtime owns the KV cache and its batch
        "model_transaction_policy": {"decoupled": True},
        "input": [{"name": n, "data_type": Enum(t), "dims": d, "optional": o} for n, t, d, o in GENERATION_INPUTS],
        "output": [{"name": n, "data_type": Enum(t), "dims": d} for n, t, d in GENERATION_OUTPUTS],
        "instance_group": instance_group(scaling, gpu),
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in parameters.items()],
    }
