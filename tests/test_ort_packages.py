"""A CUDA run whose ONNX Runtime has no CUDA provider says which packages are installed and how to keep one
(apet/runtime/backends/ort_packages.py): onnxruntime and onnxruntime-gpu install one module between them."""

from __future__ import annotations

from importlib import metadata

import onnxruntime
import pytest

from apet.errors import BackendError, option
from apet.runtime.backends.ort_packages import installed_distributions, no_cuda_provider
from apet.runtime.pipeline import Pipeline

CPU_ONLY = ["CPUExecutionProvider"]


def test_both_installed_names_the_clash_and_keeps_the_gpu_build() -> None:
    problem, fix = no_cuda_provider(CPU_ONLY, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert "onnxruntime-gpu 1.31.1 is installed beside onnxruntime" in problem and "installed last" in problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1" in fix
    assert "pip install -U --no-deps apet" in fix and option("device", "cpu") in fix


def test_cpu_build_only_swaps_it_for_the_gpu_build() -> None:
    problem, fix = no_cuda_provider(CPU_ONLY, {"onnxruntime": "1.32.0"})
    assert problem == f"ONNX Runtime has no CUDAExecutionProvider here (available: {CPU_ONLY})"
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu;" in fix  # no version pinned
    assert "Jetson" in fix


def test_gpu_build_alone_without_its_provider() -> None:
    problem, fix = no_cuda_provider(CPU_ONLY, {"onnxruntime-gpu": "1.31.1"})
    assert "although onnxruntime-gpu 1.31.1 is installed" in problem
    assert "pip uninstall -y onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1" in fix


def test_installed_distributions_reads_this_environment() -> None:
    found = installed_distributions()
    assert found and onnxruntime.__version__ in found.values()
    for name, version in found.items():
        assert metadata.version(name) == version


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this ONNX Runtime has its CUDA provider")
def test_pipeline_on_cuda_without_the_provider_says_what_to_do(artifact_factory) -> None:
    with pytest.raises(BackendError) as caught:
        Pipeline.load(artifact_factory(), backend="onnxruntime", device="cuda")
    message = str(caught.value)
    assert "no CUDAExecutionProvider" in message
    assert "pip install onnxruntime-gpu" in message and option("device", "cpu") in message
