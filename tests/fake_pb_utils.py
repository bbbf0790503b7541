"""A stand-in for Triton's ``triton_python_backend_utils`` (only Triton's Python stub has the real one).

Just what apet's Python models use: tensors, requests with a response sender, responses, errors, and BLS
(``InferenceRequest.exec``), which runs the model registered in :data:`MODELS` in this process, so a test
exercises the generation model's BLS call against apet's real Python vision model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
MODELS: dict[str, Any] = {}  # model name -> an initialized TritonPythonModel (what BLS calls reach)
BLS_CALLS: list[str] = []  # model names, one per BLS call


class TritonError(Exception):
    INVALID_ARG = 3
    INTERNAL = 13

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor {name} needs a numpy array, got {type(array).__name__}")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs, self._error = list(output_tensors or []), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs


class ResponseSender:
    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.sent and self.sent[-1][1] & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise TritonModelException("a response was sent after the final flag")
        self.sent.append((response, flags))


class InferenceRequest:
    def __init__(self, model_name: str = "", requested_output_names: list[str] | None = None,
                 inputs: list[Tensor] | None = None) -> None:
        self.model_name, self.requested = model_name, list(requested_output_names or [])
        self.inputs = list(inputs or [])
        self.sender = ResponseSender()

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def exec(self) -> InferenceResponse:
        BLS_CALLS.append(self.model_name)
        if self.model_name not in MODELS:
            return InferenceResponse(error=TritonError(f"model {self.model_name} is not loaded"))
        return MODELS[self.model_name].execute([self])[0]


def _find(tensors: list[Tensor], name: str) -> Tensor | None:
    return next((t for t in tensors if t.name() == name), None)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return _find(request.inputs, name)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return _find(response.output_tensors(), name)
