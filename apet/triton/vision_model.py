"""The vision model's Python-backend form: the vision graph through ONNX Runtime, for Triton builds without the
ONNX Runtime backend (pytriton's server, minimal images); the same inputs and outputs as the
``onnxruntime_onnx`` form, so the generation model's BLS call does not change (docs/triton.md).

Requests Triton batched together (``dynamic_batching``) run as one ONNX Runtime call: their rows are
concatenated, then split back per request. The graph's SHA-256 is checked at load against the manifest's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from apet.runtime.backends.ort_packages import installed_distributions, no_cuda_provider
from apet.triton.backend_utils import (
    check_digest,
    device_of,
    model_config,
    parameters,
    triton_error,
    triton_utils,
    version_dir,
)

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort  # a base dependency of apet

        self.pb = triton_utils()
        config = model_config(args)
        path = version_dir(args) / "model.onnx"
        check_digest(path, parameters(config).get("sha256", ""), "the vision graph")
        on_gpu, available = device_of(args).startswith("cuda"), ort.get_available_providers()
        cuda = on_gpu and "CUDAExecutionProvider" in available
        if on_gpu and not cuda:  # Triton placed this instance on a GPU: say why it runs on the CPU
            problem, fix = no_cuda_provider(available, installed_distributions())
            log.warning("the vision model runs on the CPU: %s — %s", problem, fix)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        feeds = [{n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        try:
            if self.batched and len(feeds) > 1:
                sizes = [len(f[self.inputs[0]]) for f in feeds]
                joined = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
                outputs = self.session.run(self.outputs, joined)
                bounds = np.cumsum(sizes)[:-1]
                per_request = [list(parts) for parts in zip(*(np.split(o, bounds) for o in outputs))]
            else:
                per_request = [self.session.run(self.outputs, f) for f in feeds]
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            log.exception("vision run failed")
            return [pb.InferenceResponse(error=triton_error(pb, exc)) for _ in requests]
        return [pb.InferenceResponse(output_tensors=[pb.Tensor(n, np.ascontiguousarray(a))
                                                     for n, a in zip(self.outputs, arrays)])
                for arrays in per_request]

    def finalize(self) -> None:
        self.session = None
