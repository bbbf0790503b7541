"""The CUDA execution provider in a process without torch: its libraries loaded from the nvidia-* wheels (quietly:
stdout may be a pipe of generated text), and a session that fell back to the CPU refused rather than run a 7B model
on the CPU for minutes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from apet.errors import BackendError
from apet.runtime.backends.ort_options import CUDA_PROVIDER, check_provider, load_cuda_libraries


def test_cuda_libraries_load_without_printing_to_stdout(capsys, caplog) -> None:
    calls = []

    def preload_dlls():
        calls.append(True)
        print("Failed to load libcudnn.so.9: not found")

    with caplog.at_level(logging.INFO, logger="apet.runtime.backends.ort_options"):
        load_cuda_libraries(SimpleNamespace(preload_dlls=preload_dlls))
    assert calls == [True] and capsys.readouterr().out == ""
    assert "libcudnn.so.9" in caplog.text

    def broken():
        raise RuntimeError("Invalid parameter of directory")

    load_cuda_libraries(SimpleNamespace(preload_dlls=broken))  # the provider check reports what is missing
    load_cuda_libraries(SimpleNamespace())  # a release without preload_dlls loads by the default paths


def test_a_session_that_fell_back_to_the_cpu_is_refused() -> None:
    def session(*providers):
        return SimpleNamespace(get_providers=lambda: list(providers))

    check_provider(session(CUDA_PROVIDER, "CPUExecutionProvider"), CUDA_PROVIDER)
    check_provider(session("CPUExecutionProvider"), "CPUExecutionProvider")
    with pytest.raises(BackendError, match="could not start its CUDA execution provider") as err:
        check_provider(session("CPUExecutionProvider"), CUDA_PROVIDER)
    assert "device='cpu'" in err.value.fix and "onnxruntime-gpu" in err.value.fix  # the API's spelling here
