"""An in-memory stand-in for ``cuda.bindings.driver``: the subset apet.cuda_memory calls.

"Device" memory is real host memory (ctypes buffers), so copies are real memmoves at the addresses the
code under test computed, and every device range is checked to lie inside one live allocation: a wrong
offset, a view past its buffer or a use after free is a CUDA_ERROR_INVALID_VALUE, as on a GPU (or worse).
Calls return ``(CUresult, *values)`` like the real bindings.
"""

from __future__ import annotations

import ctypes
import enum
import itertools

import numpy as np


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_INVALID_HANDLE = 400


OK = CUresult.CUDA_SUCCESS


class FakeDriver:
    def __init__(self, devices: int = 1, total: int = 1 << 30, libcuda: bool = True) -> None:
        self.devices, self.total, self.libcuda = devices, total, libcuda
        self.memory: dict[int, ctypes.Array] = {}  # address -> backing buffer
        self.current = None
        self.calls: list[str] = []
        self.ids = itertools.count(1)
        self.events: dict[int, float] = {}
        self.streams: set[int] = set()
        self.retained = 0
        self.fail: dict[str, CUresult] = {}  # call name -> error to return once

    # -- helpers for tests -------------------------------------------------------------------------
    def used(self) -> int:
        return sum(len(b) for b in self.memory.values())

    def find(self, address: int, nbytes: int) -> bool:
        """Whether [address, address+nbytes) lies inside one live allocation."""
        for base, buf in self.memory.items():
            if base <= address and address + nbytes <= base + len(buf):
                return True
        return False

    def array(self, address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A host view of device memory, as a fake engine reads and writes it."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        assert self.find(address, nbytes), f"engine binding {shape} {dtype} at {address:#x} is out of bounds"
        raw = (ctypes.c_char * nbytes).from_address(address)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def _enter(self, name: str) -> CUresult:
        self.calls.append(name)
        if name in self.fail:
            return self.fail.pop(name)
        if name not in ("cuInit", "cuDeviceGetCount", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
                        "cuCtxSetCurrent", "cuDevicePrimaryCtxRelease") and self.current is None:
            return CUresult.CUDA_ERROR_INVALID_CONTEXT
        return OK

    # -- the driver API ------------------------------------------------------------------------------
    def cuInit(self, flags: int):
        if not self.libcuda:
            raise RuntimeError("Failed to dlopen libcuda.so.1")
        err = self._enter("cuInit")
        return (err if err else (OK if self.devices else CUresult.CUDA_ERROR_NO_DEVICE),)

    def cuDeviceGetCount(self):
        return self._enter("cuDeviceGetCount"), self.devices

    def cuDeviceGet(self, index: int):
        return self._enter("cuDeviceGet"), index

    def cuDeviceGetName(self, length: int, dev):
        return self._enter("cuDeviceGetName"), b"Fake GPU\0\0\0"

    def cuDevicePrimaryCtxRetain(self, dev):
        self.retained += 1
        return self._enter("cuDevicePrimaryCtxRetain"), 1000 + dev

    def cuDevicePrimaryCtxRelease(self, dev):
        self.retained -= 1
        return (self._enter("cuDevicePrimaryCtxRelease"),)

    def cuCtxSetCurrent(self, ctx):
        self.current = ctx
        return (self._enter("cuCtxSetCurrent"),)

    def cuCtxSynchronize(self):
        return (self._enter("cuCtxSynchronize"),)

    def cuMemGetInfo(self):
        return self._enter("cuMemGetInfo"), self.total - self.used(), self.total

    def cuMemAlloc(self, nbytes: int):
        err = self._enter("cuMemAlloc")
        if err:
            return err, 0
        if self.used() + nbytes > self.total:
            return CUresult.CUDA_ERROR_OUT_OF_MEMORY, 0
        buf = ctypes.create_string_buffer(b"\xa5" * nbytes, nbytes)  # garbage, like fresh device memory
        address = ctypes.addressof(buf)
        self.memory[address] = buf
        return OK, address

    def cuMemFree(self, address: int):
        err = self._enter("cuMemFree")
        if err:
            return (err,)
        if address not in self.memory:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        del self.memory[address]
        return (OK,)

    def _copy(self, name: str, dst: int, src: int, nbytes: int, stream, device: tuple[bool, bool]):
        err = self._enter(name)
        if err:
            return (err,)
        if stream != 0 and int(stream) not in self.streams:
            return (CUresult.CUDA_ERROR_INVALID_HANDLE,)
        if (device[0] and not self.find(dst, nbytes)) or (device[1] and not self.find(src, nbytes)):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        ctypes.memmove(dst, src, nbytes)
        return (OK,)

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        return self._copy("cuMemcpyHtoDAsync", int(dst), int(src), nbytes, stream, (True, False))

    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        return self._copy("cuMemcpyDtoHAsync", int(dst), int(src), nbytes, stream, (False, True))

    def cuMemcpyDtoDAsync(self, dst, src, nbytes, stream):
        return self._copy("cuMemcpyDtoDAsync", int(dst), int(src), nbytes, stream, (True, True))

    def cuMemsetD8Async(self, dst, value, nbytes, stream):
        err = self._enter("cuMemsetD8Async")
        if err:
            return (err,)
        if not self.find(int(dst), nbytes):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        ctypes.memset(int(dst), value, nbytes)
        return (OK,)

    def cuStreamCreate(self, flags: int):
        handle = 50_000 + next(self.ids)
        self.streams.add(handle)
        return self._enter("cuStreamCreate"), handle

    def cuStreamSynchronize(self, stream):
        return (self._enter("cuStreamSynchronize"),)

    def cuStreamDestroy(self, stream):
        self.streams.discard(int(stream))
        return (self._enter("cuStreamDestroy"),)

    def cuEventCreate(self, flags: int):
        handle = 70_000 + next(self.ids)
        self.events[handle] = -1.0
        return self._enter("cuEventCreate"), handle

    def cuEventRecord(self, event, stream):
        self.events[int(event)] = float(len(self.calls))  # "time" = calls so far
        return (self._enter("cuEventRecord"),)

    def cuEventSynchronize(self, event):
        return (self._enter("cuEventSynchronize"),)

    def cuEventElapsedTime(self, start, end):
        err = self._enter("cuEventElapsedTime")
        if self.events[int(start)] < 0 or self.events[int(end)] < 0:
            return CUresult.CUDA_ERROR_INVALID_HANDLE, 0.0
        return err, self.events[int(end)] - self.events[int(start)]

    def cuEventDestroy(self, event):
        self.events.pop(int(event), None)
        return (self._enter("cuEventDestroy"),)


# -- a TensorRT stand-in whose engines are the artifact's ONNX graphs run by ONNX Runtime -------------------
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class FakeContext:
    """An execution context that reads its inputs from the bound device addresses (with the shapes set by
    ``set_input_shape`` and the dtypes the ONNX graph declares) and writes ONNX Runtime's outputs to the
    bound output addresses, which must be large enough (the fake driver checks)."""

    def __init__(self, engine: "FakeEngine") -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.profile, self.runs, self._outputs = 0, [], None
        self.types = {i.name: _ORT_TYPES[i.type] for i in engine.session.get_inputs()}

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        assert name in self.types, f"{name} is not an input of {self.engine.name}"
        self.shapes[name] = tuple(shape)
        self._outputs = None
        return True

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = int(address)
        self._outputs = None

    def _compute(self) -> dict[str, np.ndarray]:
        if self._outputs is None:
            missing = set(self.types) - set(self.shapes)
            assert not missing, f"inputs without a shape: {missing}"
            feeds = {name: self.engine.driver.array(self.addresses[name], self.shapes[name], dtype).copy()
                     for name, dtype in self.types.items()}
            names = [o.name for o in self.engine.session.get_outputs()]
            self._outputs = dict(zip(names, self.engine.session.run(names, feeds)))
            self.last_feeds = feeds
        return self._outputs

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(self._compute()[name].shape)

    def execute_async_v3(self, stream: int) -> bool:
        outputs = self._compute()
        for name, value in outputs.items():
            self.engine.driver.array(self.addresses[name], value.shape, value.dtype)[...] = value
        self.runs.append({name: shape for name, shape in self.shapes.items()})
        self._outputs = None
        return True


class FakeEngine:
    def __init__(self, name: str, session, driver: FakeDriver) -> None:
        self.name, self.session, self.driver = name, session, driver
        self.contexts: list[FakeContext] = []
        self.device_memory_size_v2 = 4096

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTensorRT:
    """The ``tensorrt`` module as far as the backend uses it; a plan file's bytes name its ONNX graph."""

    __version__ = "10.3.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    def __init__(self, graphs: dict, driver: FakeDriver) -> None:
        self.graphs, self.driver = graphs, driver  # engine name -> ONNX path
        self.engines: dict[str, FakeEngine] = {}

    def Runtime(self, logger) -> "FakeTensorRT":  # noqa: N802 - TensorRT's spelling
        return self

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine:
        import onnxruntime as ort

        name = plan.decode()
        session = ort.InferenceSession(str(self.graphs[name]), providers=["CPUExecutionProvider"])
        self.engines[name] = FakeEngine(name, session, self.driver)
        return self.engines[name]
