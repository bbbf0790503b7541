"""Device memory, streams and events through NVIDIA's CUDA driver API bindings (``cuda-python``), not torch.

Why: the TensorRT backend only needs raw device pointers for ``set_tensor_address``, copies between host
and device, and a stream. torch provides them, but on a Jetson PyPI's aarch64 torch has no CUDA, so the
engines would look unusable there (docs/jetson.md). The driver API is the smallest stable surface that
``cuda.bindings`` 12.x (JetPack 6) and 13.x (JetPack 7) share: we use the device's *primary* context
(``cuDevicePrimaryCtxRetain``) because it is the one the CUDA runtime inside TensorRT uses, and because
``cuCtxCreate`` changed its signature in 13.x.

Every driver call goes through :func:`call`, which turns a non-zero ``CUresult`` (or a driver library that
cannot be loaded) into a :class:`CudaError` naming the call, the error and a fix. Every function takes the
driver module as a value, so CPU tests run this module's logic against an in-memory driver.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from apet.errors import BackendError, MissingExtraError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'apet[cuda12]' (JetPack 6, CUDA 12.x) or 'apet[cuda13]' (JetPack 7 / CUDA 13)"

_FIXES = {
    2: "free GPU memory (other processes, a smaller --max-batch/--max-context at apet-build)",
    100: "no CUDA device is visible: check nvidia-smi (tegrastats on a Jetson) and CUDA_VISIBLE_DEVICES, "
         "or use --backend onnxruntime",
    101: "the device index is out of range: use cuda:0 .. cuda:N-1",
    803: "the CUDA driver and its user-mode library differ in version: reinstall the driver (JetPack on a Jetson)",
}


class CudaError(BackendError):
    """A CUDA driver call failed; ``code`` and ``name`` are the driver's ``CUresult``."""

    def __init__(self, what: str, fix: str | None = None, code: int = -1, name: str = "") -> None:
        super().__init__(what, fix)
        self.code, self.name = code, name


def load_driver() -> ModuleType:
    """``cuda.bindings.driver`` (cuda-python >= 12.6), else the older ``cuda.cuda`` layout; a missing package
    is one actionable line."""
    try:
        from cuda.bindings import driver

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # type: ignore[attr-defined]  # cuda-python < 12.6

        return driver
    except ImportError as exc:
        raise MissingExtraError(f"the tensorrt backend needs NVIDIA's CUDA Python bindings, which are not installed "
                           f"({exc})", INSTALL_HINT) from exc


def _error_name(err: Any, code: int) -> str:
    name = getattr(err, "name", None)
    if name:
        return str(name)
    try:
        return str(type(err)(code).name)
    except Exception:
        return f"CUresult {code}"


def call(what: str, result: Any) -> Any:
    """Check one driver result ``(CUresult, *values)``: the values (one, a tuple, or None) or a CudaError."""
    if not isinstance(result, tuple):
        result = (result,)
    err, *values = result
    code = int(getattr(err, "value", err))
    if code != 0:
        name = _error_name(err, code)
        raise CudaError(f"CUDA {what} failed with {name} ({code})",
                        _FIXES.get(code, f"see {name} in the CUDA driver API documentation; --verbose logs the "
                                         "call sequence"), code, name)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def guarded(what: str, fn: Any, *args: Any) -> Any:
    """:func:`call` for the first calls into the driver, which raise (not return) when libcuda is absent."""
    try:
        result = fn(*args)
    except Exception as exc:  # DynamicLibNotFoundError / RuntimeError: libcuda cannot be loaded
        raise CudaError(f"the CUDA driver library (libcuda) cannot be loaded for {what} ({exc})",
                        "install the NVIDIA driver (on a Jetson it ships with JetPack), or use --backend "
                        "onnxruntime") from exc
    return call(what, result)


def handle(obj: Any) -> int:
    """A driver handle (CUdeviceptr, CUstream, ...) or an int as the integer TensorRT takes."""
    return int(obj)


def cuda_device_count(driver: ModuleType | None = None) -> int:
    """Visible CUDA devices through the driver (no torch); 0 when the bindings or the driver are absent."""
    try:
        driver = driver or load_driver()
        guarded("cuInit", driver.cuInit, 0)
        return int(call("cuDeviceGetCount", driver.cuDeviceGetCount()))
    except (BackendError, MissingExtraError) as exc:
        log.debug("no CUDA device: %s", exc)
        return 0


def device_index(device: str) -> int:
    """``cuda`` / ``cuda:N`` -> N."""
    return int(device.split(":")[1]) if ":" in device else 0


class CudaDevice:
    """One device's primary context, and the allocations, streams and events made in it.

    It keeps a ledger of live allocations (address -> bytes) so that :meth:`close` frees what the caller
    forgot and ``peak_bytes`` reports the high-water mark of what apet allocated.
    """

    def __init__(self, index: int = 0, driver: ModuleType | None = None) -> None:
        self.driver = driver or load_driver()
        d = self.driver
        guarded("cuInit", d.cuInit, 0)
        count = int(call("cuDeviceGetCount", d.cuDeviceGetCount()))
        if not 0 <= index < count:
            raise CudaError(f"cuda:{index} is not a visible CUDA device (this machine shows {count})",
                            "use cuda:0 .. cuda:N-1, or --backend onnxruntime" if count else _FIXES[100],
                            100 if not count else 101, "CUDA_ERROR_NO_DEVICE" if not count else
                            "CUDA_ERROR_INVALID_DEVICE")
        self.index = index
        self.device = call("cuDeviceGet", d.cuDeviceGet(index))
        self.context = call("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self.device))
        self.bind()
        self.live: dict[int, int] = {}
        self.allocated = self.peak_bytes = 0
        self.closed = False

    def bind(self) -> None:
        """Make the context current on this thread (apet-serve calls the backend from worker threads)."""
        call("cuCtxSetCurrent", self.driver.cuCtxSetCurrent(self.context))

    @property
    def name(self) -> str:
        raw = call("cuDeviceGetName", self.driver.cuDeviceGetName(256, self.device))
        return (raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip()

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device, as the driver sees them."""
        self.bind()
        free, total = call("cuMemGetInfo", self.driver.cuMemGetInfo())
        return int(free), int(total)

    def allocate(self, shape: tuple[int, ...] | int, dtype: Any) -> "DeviceBuffer":
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self.bind()
        address = handle(call(f"cuMemAlloc of {nbytes} bytes", self.driver.cuMemAlloc(max(nbytes, 1))))
        self.live[address] = max(nbytes, 1)
        self.allocated += self.live[address]
        self.peak_bytes = max(self.peak_bytes, self.allocated)
        return DeviceBuffer(self, address, shape, dtype, capacity=max(nbytes, 1))

    def free(self, address: int) -> None:
        if address not in self.live:
            return  # freed already (close() after an explicit free)
        self.bind()
        call("cuMemFree", self.driver.cuMemFree(address))
        self.allocated -= self.live.pop(address)

    def stream(self) -> "Stream":
        self.bind()
        return Stream(self, call("cuStreamCreate", self.driver.cuStreamCreate(0)))

    def event(self) -> "Event":
        self.bind()
        return Event(self, call("cuEventCreate", self.driver.cuEventCreate(0)))

    def synchronize(self) -> None:
        self.bind()
        call("cuCtxSynchronize", self.driver.cuCtxSynchronize())

    def close(self) -> None:
        """Free every live allocation and release the primary context (once)."""
        if self.closed:
            return
        for address in list(self.live):
            self.free(address)
        call("cuDevicePrimaryCtxRelease", self.driver.cuDevicePrimaryCtxRelease(self.device))
        self.closed = True


@dataclass(frozen=True)
class Stream:
    device: CudaDevice
    raw: Any

    @property
    def handle(self) -> int:
        """The integer TensorRT's ``execute_async_v3`` / ``set_optimization_profile_async`` take."""
        return handle(self.raw)

    def synchronize(self) -> None:
        call("cuStreamSynchronize", self.device.driver.cuStreamSynchronize(self.raw))

    def close(self) -> None:
        call("cuStreamDestroy", self.device.driver.cuStreamDestroy(self.raw))


@dataclass(frozen=True)
class Event:
    device: CudaDevice
    raw: Any

    def record(self, stream: Stream) -> None:
        call("cuEventRecord", self.device.driver.cuEventRecord(self.raw, stream.raw))

    def synchronize(self) -> None:
        call("cuEventSynchronize", self.device.driver.cuEventSynchronize(self.raw))

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to ``end`` (both recorded; waits for ``end``)."""
        end.synchronize()
        return float(call("cuEventElapsedTime", self.device.driver.cuEventElapsedTime(self.raw, end.raw)))

    def close(self) -> None:
        call("cuEventDestroy", self.device.driver.cuEventDestroy(self.raw))


@dataclass
class DeviceBuffer:
    """A typed, C-contiguous region of device memory: an allocation, or a view of one (``view``).

    ``capacity`` is how many bytes from ``address`` belong to the allocation, so a view can never reach
    past it: the KV cache's ping-pong buffers are flat allocations viewed as [B, kv, P, d] prefixes.
    """

    device: CudaDevice
    address: int
    shape: tuple[int, ...]
    dtype: np.dtype
    capacity: int
    owner: "DeviceBuffer | None" = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def view(self, shape: tuple[int, ...] | int, dtype: Any = None, offset: int = 0) -> "DeviceBuffer":
        """The contiguous ``shape`` starting ``offset`` elements (of ``dtype``) in, without copying."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        start = int(offset) * dtype.itemsize
        nbytes = math.prod(shape) * dtype.itemsize
        if offset < 0 or start + nbytes > self.capacity:
            raise BackendError(f"a view of {shape} {dtype} at element {offset} needs {start + nbytes} bytes, "
                               f"the buffer holds {self.capacity}", "this is a bug in apet: please report it")
        return DeviceBuffer(self.device, self.address + start, shape, dtype, self.capacity - start,
                            self.owner or self)

    def upload(self, array: np.ndarray, stream: Stream | None = None) -> "DeviceBuffer":
        """Copy a host array of this buffer's shape in (cast to its dtype). From pageable memory the call
        returns once the host data has been staged, so ``array`` may be dropped afterwards."""
        host = np.ascontiguousarray(array, dtype=self.dtype)
        if host.shape != self.shape:
            raise BackendError(f"cannot upload an array of shape {host.shape} into a device buffer of {self.shape}",
                               "this is a bug in apet: please report it")
        if self.nbytes:  # an empty tensor (a decode step's N = 0 injected rows) has nothing to copy
            self.device.bind()
            call("cuMemcpyHtoDAsync", self.device.driver.cuMemcpyHtoDAsync(
                self.address, host.ctypes.data, self.nbytes, _stream(stream)))
        return self

    def download(self, stream: Stream | None = None) -> np.ndarray:
        """A new host array with this buffer's contents (waits for the copy and the work before it)."""
        host = np.empty(self.shape, dtype=self.dtype)
        self.device.bind()
        call("cuMemcpyDtoHAsync", self.device.driver.cuMemcpyDtoHAsync(
            host.ctypes.data, self.address, self.nbytes, _stream(stream)))
        if stream is None:
            self.device.synchronize()
        else:
            stream.synchronize()
        return host

    def copy_from(self, other: "DeviceBuffer", stream: Stream | None = None) -> "DeviceBuffer":
        """Device-to-device copy of ``other`` (same byte size) into this buffer."""
        if other.nbytes != self.nbytes:
            raise BackendError(f"device copy of {other.nbytes} bytes into a buffer of {self.nbytes}",
                               "this is a bug in apet: please report it")
        self.device.bind()
        call("cuMemcpyDtoDAsync", self.device.driver.cuMemcpyDtoDAsync(
            self.address, other.address, self.nbytes, _stream(stream)))
        return self

    def zero(self, stream: Stream | None = None) -> "DeviceBuffer":
        self.device.bind()
        call("cuMemsetD8Async", self.device.driver.cuMemsetD8Async(self.address, 0, self.nbytes, _stream(stream)))
        return self

    def free(self) -> None:
        """Free the allocation (views: nothing; their owner frees)."""
        if self.owner is None:
            self.device.free(self.address)


def _stream(stream: Stream | None) -> Any:
    return 0 if stream is None else stream.raw


class Scratch:
    """Reusable device buffers by name, grown when a step needs more: a decode loop would otherwise call
    cuMemAlloc/cuMemFree (which synchronises the device) for every binding of every token."""

    def __init__(self, device: CudaDevice) -> None:
        self.device = device
        self.buffers: dict[str, DeviceBuffer] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> DeviceBuffer:
        dtype = np.dtype(dtype)
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        held = self.buffers.get(name)
        if held is None or held.capacity < nbytes:
            if held is not None:
                held.free()
            held = self.buffers[name] = self.device.allocate(max(nbytes // dtype.itemsize, 1), dtype)
        return held.view(shape, dtype)
