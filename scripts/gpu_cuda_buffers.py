"""The torch-free device buffer layer (apet/cuda_memory.py) on a real NVIDIA GPU.

Run from the repository root:  PYTHONPATH=. python scripts/gpu_cuda_buffers.py
Needs cuda-bindings 12.x or 13.x (apet[cuda12] / apet[cuda13]) and a CUDA device; not TensorRT, not torch.
Each check runs on its own (one failure does not stop the others); a PASS/FAIL table goes to stdout and
the details to $OUT/gpu_cuda_buffers.json (OUT defaults to ./gpu_out). Exit status 1 if any check failed,
2 if the device could not be opened at all. The CPU tests (tests/test_cuda_memory.py) run the same logic
against an in-memory driver.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from apet.cuda_memory import CudaDevice, load_driver

MiB = 1 << 20
DTYPES = [np.float16, np.float32, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_]
SHAPES = [(1,), (7,), (3, 5, 7), (2, 8, 1024, 64), (4097,), (1, 1, 1, 1)]


def _random(shape: tuple[int, ...], dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Random bits of every byte pattern (NaNs and infinities included for floats): bit exactness."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def check_round_trips(dev: CudaDevice) -> dict:
    rng, cases = np.random.default_rng(0), 0
    for dtype in DTYPES:
        for shape in SHAPES:
            host = _random(shape, dtype, rng)
            buffer = dev.allocate(shape, dtype)
            back = buffer.upload(host).download()
            buffer.free()
            assert back.shape == host.shape and back.dtype == host.dtype, (shape, dtype)
            assert back.tobytes() == host.tobytes(), f"round trip differs for {shape} {np.dtype(dtype)}"
            cases += 1
    return {"cases": cases, "dtypes": [np.dtype(d).name for d in DTYPES]}


def check_device_copies_and_views(dev: CudaDevice) -> dict:
    rng = np.random.default_rng(1)
    host = _random((64, 1000), np.float16, rng)
    a = dev.allocate(host.shape, np.float16).upload(host)
    b = dev.allocate(host.shape, np.float16).zero()
    assert not b.download().view(np.uint16).any(), "zero() left non-zero bytes"
    b.copy_from(a)
    assert b.download().tobytes() == host.tobytes(), "device-to-device copy differs"
    flat = dev.allocate(host.size * 2, np.float16).zero()
    flat.view(host.shape, offset=host.size).copy_from(a)  # second half
    out = flat.download()
    assert not out[: host.size].view(np.uint16).any() and out[host.size:].tobytes() == host.tobytes()
    assert np.array_equal(flat.view((10,), np.int32, offset=host.size // 2).download(),
                          host.ravel().view(np.int32)[:10]), "typed view at an offset differs"
    for buffer in (a, b, flat):
        buffer.free()
    return {"bytes": int(host.nbytes)}


def check_ping_pong_cache(dev: CudaDevice) -> dict:
    """The TensorRT backend's KV cache: two flat buffers per layer sized for max_context; a step reads the
    past [B, kv, P, d] from one and writes the present [B, kv, P+S, d] to the other (here a device-to-device
    copy of the past plus an upload of the new rows, as the engine would write them), then they swap."""
    layers, batch, heads, dim, capacity = 4, 2, 8, 128, 4096
    rng = np.random.default_rng(2)
    elements = batch * heads * capacity * dim
    cache = {f"past_key.{i}": [dev.allocate(elements, np.float16) for _ in range(2)] for i in range(layers)}
    stream = dev.stream()
    current, past, steps = 0, 0, [600, 1, 1, 1, 37, 1, 1]
    reference = {name: np.zeros((batch, heads, 0, dim), np.float16) for name in cache}
    for seq in steps:
        for name, buffers in cache.items():
            new = _random((batch, heads, seq, dim), np.float16, rng)
            seen = buffers[current].view((batch, heads, past, dim)).download(stream)
            assert seen.tobytes() == reference[name].tobytes(), f"{name}: past after {past} tokens differs"
            present = buffers[1 - current].view((batch, heads, past + seq, dim))
            staged = dev.allocate((batch, heads, past + seq, dim), np.float16)
            # the engine writes [B, kv, P+S, d]: rows of each (b, h) are contiguous, so the past is copied
            # head by head into its place inside the longer present
            for b in range(batch):
                for h in range(heads):
                    row = (b * heads + h)
                    staged.view((past, dim), offset=row * (past + seq) * dim).copy_from(
                        buffers[current].view((past, dim), offset=row * past * dim), stream)
            host_present = staged.download(stream)
            host_present[:, :, past:] = new
            present.upload(host_present, stream)
            staged.free()
            reference[name] = np.concatenate([reference[name], new], axis=2)
        current, past = 1 - current, past + seq
    for name, buffers in cache.items():
        got = buffers[current].view((batch, heads, past, dim)).download(stream)
        assert got.tobytes() == reference[name].tobytes(), f"{name}: final cache differs"
        for buffer in buffers:
            buffer.free()
    stream.close()
    return {"layers": layers, "steps": steps, "final_length": past, "buffer_mib": elements * 2 / MiB}


def check_stream_event_timing(dev: CudaDevice) -> dict:
    stream, start, end = dev.stream(), dev.event(), dev.event()
    size = 256 * MiB
    src, dst = dev.allocate(size, np.uint8).zero(stream), dev.allocate(size, np.uint8)
    host = np.ones(size, np.uint8)
    start.record(stream)
    for _ in range(10):
        dst.copy_from(src, stream)
    end.record(stream)
    d2d_ms = start.elapsed_ms(end)
    start.record(stream)
    dst.upload(host, stream)
    end.record(stream)
    h2d_ms = start.elapsed_ms(end)
    t0 = time.perf_counter()
    back = dst.download(stream)
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert back.all(), "upload after the copies did not land"
    d2d_gbs = 10 * 2 * size / (d2d_ms / 1e3) / 1e9  # read + write
    h2d_gbs = size / (h2d_ms / 1e3) / 1e9
    assert d2d_ms > 0 and h2d_ms > 0, "events measured no time"
    assert 10 < d2d_gbs < 20_000, f"device copy bandwidth {d2d_gbs:.0f} GB/s is implausible"
    assert 0.5 < h2d_gbs < 1_000, f"host-to-device bandwidth {h2d_gbs:.1f} GB/s is implausible"
    for item in (src, dst):
        item.free()
    for item in (start, end, stream):
        item.close()
    return {"d2d_ms_10x256MiB": round(d2d_ms, 3), "d2d_GBps": round(d2d_gbs, 1), "h2d_ms_256MiB": round(h2d_ms, 3),
            "h2d_GBps": round(h2d_gbs, 1), "d2h_wall_ms_256MiB": round(wall_ms, 3)}


def check_no_leak(dev: CudaDevice) -> dict:
    dev.synchronize()
    free_before, total = dev.memory_info()
    for step in range(200):
        buffers = [dev.allocate(((step % 7) + 1) * 8 * MiB, np.uint8) for _ in range(4)]
        buffers[0].view((MiB,)).free()  # a view frees nothing
        for buffer in buffers:
            buffer.free()
    dev.synchronize()
    free_after, _ = dev.memory_info()
    assert dev.allocated == 0 and not dev.live, f"ledger still holds {dev.allocated} bytes"
    lost = free_before - free_after
    assert lost <= 4 * MiB, f"{lost / MiB:.1f} MiB of device memory did not come back"
    return {"iterations": 200, "free_before_mib": free_before / MiB, "free_after_mib": free_after / MiB,
            "total_mib": total / MiB, "lost_mib": lost / MiB}


def check_other_thread(dev: CudaDevice) -> dict:
    """apet-serve runs requests on worker threads: the context must be bound there too."""
    result: dict = {}

    def work() -> None:
        try:
            host = np.arange(1000, dtype=np.int64)
            buffer = dev.allocate(host.shape, np.int64).upload(host)
            result["ok"] = bool(np.array_equal(buffer.download(), host))
            buffer.free()
        except Exception as exc:  # reported below
            result["error"] = repr(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert result.get("ok"), result.get("error", "the worker thread's round trip differed")
    return result


def check_errors_are_apet_errors(dev: CudaDevice) -> dict:
    from apet.errors import BackendError

    _, total = dev.memory_info()
    try:
        dev.allocate(total * 2, np.uint8)
    except BackendError as exc:
        assert "CUDA_ERROR_OUT_OF_MEMORY" in str(exc), str(exc)
        message = str(exc)
    else:
        raise AssertionError("allocating twice the device's memory succeeded")
    try:
        CudaDevice(10_000)
    except BackendError as exc:
        bad_index = str(exc)
    else:
        raise AssertionError("device 10000 opened")
    return {"oom": message, "bad_index": bad_index}


CHECKS: list[tuple[str, Callable[[CudaDevice], dict]]] = [
    ("round trips, dtypes x shapes, bit-exact", check_round_trips),
    ("device-to-device copies, views, zero", check_device_copies_and_views),
    ("ping-pong KV cache vs NumPy", check_ping_pong_cache),
    ("stream/event timing", check_stream_event_timing),
    ("alloc/free loop leaks nothing", check_no_leak),
    ("another thread binds the context", check_other_thread),
    ("errors are ApetErrors", check_errors_are_apet_errors),
]


def _environment(driver: Any, dev: CudaDevice | None) -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "numpy": np.__version__}
    try:
        import cuda.bindings

        info["cuda_bindings"] = getattr(cuda.bindings, "__version__", "?")
    except Exception as exc:
        info["cuda_bindings"] = f"unavailable ({exc})"
    try:
        err, version = driver.cuDriverGetVersion()
        info["driver_cuda_version"] = int(version)
    except Exception as exc:
        info["driver_cuda_version"] = f"? ({exc})"
    if dev is not None:
        info["device"] = dev.name
        info["device_total_mib"] = dev.memory_info()[1] / MiB
    return info


def main() -> int:
    out = Path(os.environ.get("OUT", "gpu_out"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"script": "gpu_cuda_buffers.py", "checks": []}
    try:
        driver = load_driver()
        dev = CudaDevice(0, driver)
    except Exception as exc:
        report["fatal"] = f"{type(exc).__name__}: {exc}"
        print(f"FAIL  cannot open cuda:0: {exc}")
        (out / "gpu_cuda_buffers.json").write_text(json.dumps(report, indent=2))
        return 2
    report["environment"] = _environment(driver, dev)
    print(json.dumps(report["environment"]))
    failed = 0
    for title, check in CHECKS:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"check": title}
        try:
            entry["details"] = check(dev)
            entry["status"] = "PASS"
        except Exception as exc:
            entry["status"], entry["error"] = "FAIL", f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
            failed += 1
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        report["checks"].append(entry)
    try:
        dev.close()
    except Exception as exc:
        report["close_error"] = repr(exc)
        failed += 1
    print(f"{'status':6}  {'seconds':>8}  check")
    for entry in report["checks"]:
        print(f"{entry['status']:6}  {entry['seconds']:8.3f}  {entry['check']}"
              + (f"  -- {entry['error']}" if "error" in entry else ""))
    report["passed"] = sum(e["status"] == "PASS" for e in report["checks"])
    report["failed"] = failed
    print(f"{report['passed']} passed, {failed} failed")
    (out / "gpu_cuda_buffers.json").write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
