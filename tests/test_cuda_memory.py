"""The torch-free device buffer layer (apet.cuda_memory) against an in-memory CUDA driver
(tests/fake_cuda.py): copies land at the addresses the code computes, so offsets, views and the ping-pong
arithmetic are checked against NumPy. The same checks run on a real GPU in scripts/gpu_cuda_buffers.py."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from fake_cuda import CUresult, FakeDriver

from apet import cuda_memory
from apet.cuda_memory import CudaDevice, CudaError, DeviceBuffer, Scratch, call, cuda_device_count
from apet.errors import BackendError, MissingExtraError

DTYPES = [np.float16, np.float32, np.int64, np.int32, np.uint8, np.bool_]


@pytest.fixture
def device() -> CudaDevice:
    return CudaDevice(0, FakeDriver())


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_device_host_round_trip_is_bit_exact(device: CudaDevice, dtype) -> None:
    rng = np.random.default_rng(0)
    host = rng.integers(0, 255, size=(3, 5, 7)).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        host = rng.standard_normal((3, 5, 7)).astype(dtype)
    buffer = device.allocate(host.shape, dtype).upload(host)
    back = buffer.download()
    assert back.dtype == np.dtype(dtype) and back.shape == host.shape
    assert back.tobytes() == host.tobytes()


def test_views_are_offsets_into_the_allocation(device: CudaDevice) -> None:
    flat = np.arange(24, dtype=np.float32)
    buffer = device.allocate(24, np.float32).upload(flat)
    assert np.array_equal(buffer.view((2, 3, 2), offset=6).download(), flat[6:18].reshape(2, 3, 2))
    assert buffer.view((4,), offset=20).address == buffer.address + 80
    assert np.array_equal(buffer.view((3,), np.int32, offset=2).download(), flat[2:5].view(np.int32))
    with pytest.raises(BackendError, match="needs 100 bytes, the buffer holds 96"):
        buffer.view((5,), offset=20)
    with pytest.raises(BackendError, match="the buffer holds 16"):
        buffer.view((2,), offset=20).view((5,))  # a view of a view is bounded by the allocation too


def test_device_to_device_copy_and_zero(device: CudaDevice) -> None:
    a = device.allocate((4, 4), np.float16).upload(np.eye(4, dtype=np.float16))
    b = device.allocate((4, 4), np.float16).zero()
    assert not b.download().any()
    b.copy_from(a)
    assert np.array_equal(b.download(), np.eye(4, dtype=np.float16))
    big = device.allocate(32, np.float16)
    big.view((2, 8), offset=16).copy_from(a)
    assert np.array_equal(big.download()[16:], np.eye(4, dtype=np.float16).ravel())
    with pytest.raises(BackendError, match="device copy of 32 bytes into a buffer of 64"):
        big.copy_from(a)
    with pytest.raises(BackendError, match=r"shape \(2, 2\) into a device buffer of \(4, 4\)"):
        a.upload(np.zeros((2, 2)))


def test_ping_pong_cache_matches_a_numpy_simulation(device: CudaDevice) -> None:
    """Two flat buffers per layer, sized for the longest context; each step reads the past [B, kv, P, d]
    from one and writes the present [B, kv, P+S, d] into the other, then they swap. The "engine" here is
    host code fed only through downloads of the views; the reference is a NumPy array grown by concatenation."""
    batch, heads, dim, capacity = 2, 3, 4, 16
    rng = np.random.default_rng(1)
    buffers = [device.allocate(batch * heads * capacity * dim, np.float16) for _ in range(2)]
    current, past = 0, 0
    reference = np.zeros((batch, heads, 0, dim), np.float16)
    for seq in (5, 1, 1, 3, 1):
        new = rng.standard_normal((batch, heads, seq, dim)).astype(np.float16)
        seen = buffers[current].view((batch, heads, past, dim)).download()
        assert np.array_equal(seen, reference)  # the past the engine reads is exactly the cache so far
        present = np.concatenate([seen, new], axis=2)
        buffers[1 - current].view(present.shape).upload(present)
        current, past = 1 - current, past + seq
        reference = np.concatenate([reference, new], axis=2)
    assert np.array_equal(buffers[current].view((batch, heads, past, dim)).download(), reference)


def test_scratch_reuses_and_grows(device: CudaDevice) -> None:
    scratch = Scratch(device)
    first = scratch.get("logits", (2, 8), np.float32)
    again = scratch.get("logits", (1, 8), np.float32)
    assert again.address == first.address and device.driver.calls.count("cuMemAlloc") == 1
    grown = scratch.get("logits", (4, 8), np.float32)
    assert grown.shape == (4, 8) and device.driver.calls.count("cuMemFree") == 1
    assert device.allocated == 4 * 8 * 4


def test_allocate_free_loop_leaks_nothing(device: CudaDevice) -> None:
    driver = device.driver
    free_before, total = device.memory_info()
    for step in range(50):
        buffers = [device.allocate((step + 1, 64), dtype) for dtype in DTYPES]
        for buffer in buffers:
            buffer.view((step + 1,)).free()  # a view frees nothing
        assert len(driver.memory) == len(DTYPES)
        for buffer in buffers:
            buffer.free()
    assert device.memory_info() == (free_before, total) and device.allocated == 0
    assert device.peak_bytes == 50 * 64 * sum(np.dtype(d).itemsize for d in DTYPES)
    device.allocate(10, np.int64)
    device.close()
    assert driver.memory == {} and driver.retained == 0
    device.close()  # twice is harmless


def test_stream_and_event_timing(device: CudaDevice) -> None:
    stream = device.stream()
    start, end = device.event(), device.event()
    start.record(stream)
    device.allocate(4, np.float32).upload(np.ones(4), stream)
    end.record(stream)
    assert start.elapsed_ms(end) > 0
    with pytest.raises(CudaError, match="cuEventElapsedTime failed with CUDA_ERROR_INVALID_HANDLE"):
        device.event().elapsed_ms(end)  # never recorded
    stream.synchronize()
    stream.close()
    with pytest.raises(CudaError, match="INVALID_HANDLE"):
        device.allocate(4, np.float32).upload(np.ones(4), stream)  # a destroyed stream


def test_every_failed_call_is_an_apet_error_naming_call_and_code() -> None:
    driver = FakeDriver(total=1000)
    device = CudaDevice(0, driver)
    with pytest.raises(CudaError, match=r"cuMemAlloc of 4000 bytes failed with CUDA_ERROR_OUT_OF_MEMORY \(2\)") \
            as info:
        device.allocate(1000, np.float32)
    assert info.value.exit_code == 5 and "--max-batch/--max-context" in str(info.value)
    driver.fail["cuMemcpyDtoHAsync"] = CUresult.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(CudaError, match="cuMemcpyDtoHAsync failed with CUDA_ERROR_INVALID_VALUE"):
        device.allocate(4, np.int32).download()
    assert call("x", (CUresult.CUDA_SUCCESS, 7)) == 7 and call("x", (CUresult.CUDA_SUCCESS, 1, 2)) == (1, 2)
    assert call("x", (0,)) is None
    with pytest.raises(CudaError, match=r"CUresult 12345"):
        call("cuThing", (12345,))  # a plain int code the enum does not know


def test_no_device_no_driver_or_a_bad_index_is_one_line(monkeypatch) -> None:
    with pytest.raises(CudaError, match="CUDA cuInit failed with CUDA_ERROR_NO_DEVICE") as info:
        CudaDevice(0, FakeDriver(devices=0))
    assert "--backend onnxruntime" in str(info.value)
    with pytest.raises(CudaError, match="libcuda.*cannot be loaded.*Failed to dlopen"):
        CudaDevice(0, FakeDriver(libcuda=False))
    with pytest.raises(CudaError, match="cuda:2 is not a visible CUDA device .this machine shows 2."):
        CudaDevice(2, FakeDriver(devices=2))
    assert cuda_device_count(FakeDriver(devices=3)) == 3
    assert cuda_device_count(FakeDriver(devices=0)) == 0
    assert cuda_device_count(FakeDriver(libcuda=False)) == 0


def test_missing_cuda_python_names_the_extras(monkeypatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.driver"):
        monkeypatch.setitem(sys.modules, name, None)  # import of any of them raises ImportError
    with pytest.raises(MissingExtraError) as info:
        cuda_memory.load_driver()
    message = str(info.value)
    assert "pip install 'apet[cuda12]' (JetPack 6, CUDA 12.x) or 'apet[cuda13]' (JetPack 7 / CUDA 13)" in message
    assert info.value.exit_code == 7 and "\n" not in message
    assert cuda_device_count() == 0


def test_the_buffer_layer_and_the_backend_import_no_torch() -> None:
    """The buffer layer, the TensorRT backend and the TensorRT loader in a fresh interpreter (where torch is
    installed, so an import would show): nothing of torch or transformers is loaded. The layer contract
    (.importlinter, tests/test_architecture.py) holds the same for everything they import."""
    import subprocess

    code = ("import sys, apet.cuda_memory, apet.runtime.backends.tensorrt, apet.engines.api; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None,
                    reason="cuda-python (apet[cuda12]/[cuda13]) is not installed")
def test_real_bindings_without_a_gpu_say_so() -> None:
    """With the real cuda.bindings: a machine without a GPU counts 0 devices and fails in one line."""
    if cuda_device_count() > 0:
        pytest.skip("this machine has a CUDA device: scripts/gpu_cuda_buffers.py tests it")
    with pytest.raises(CudaError, match="cannot be loaded|CUDA_ERROR_NO_DEVICE"):
        CudaDevice(0)


def test_device_buffer_is_a_plain_value(device: CudaDevice) -> None:
    """What TensorRT's set_tensor_address gets: the integer address, for allocations and views alike."""
    buffer = device.allocate((2, 3), np.float32)
    assert isinstance(buffer.address, int) and isinstance(buffer.view((3,), offset=3).address, int)
    assert isinstance(buffer, DeviceBuffer) and buffer.nbytes == 24 and buffer.size == 6
