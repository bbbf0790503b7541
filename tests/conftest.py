"""Shared fixtures: tiny checkpoints and artifacts are built once per session, in temp dirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from apet.runtime.backends.ort_options import DEFAULT_REWRITES

# ONNX Runtime's default rewrites with vision and prefill in two sessions (the first-token graph's reference)
TWO_SESSIONS = ",".join(sorted(DEFAULT_REWRITES - {"first-token"}))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``--model tiny`` caches its checkpoint here instead of the user's cache."""
    os.environ["APET_CACHE"] = str(tmp_path_factory.mktemp("apet_cache"))


@pytest.fixture(scope="session")
def rtx_api():
    """The TensorRT-RTX builder; skipped with a reason only when the wheel cannot be imported."""
    try:
        from apet.engines.api import load_api

        return load_api("tensorrt-rtx")
    except Exception as exc:  # pragma: no cover - CI installs the wheel, so this runs there
        pytest.skip(f"tensorrt_rtx_bindings is not importable here ({exc}); pip install 'apet[rtx]'")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apet.adapters.llava.tiny import create_tiny_llava

    return create_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_checkpoint: Path):
    """The tiny model loaded through the real loading code (float32)."""
    from apet.adapters.llava.adapter import LlavaAdapter

    return LlavaAdapter.load(tiny_checkpoint)


def _cached_exports(root: Path, checkpoint: Path, **defaults) -> Callable[..., Path]:
    """export(**ExportConfig options) -> artifact dir of ``checkpoint``, one export per distinct option set."""
    from apet.export.artifact import ExportConfig, export_artifact

    cache: dict[tuple, Path] = {}

    def export(**options) -> Path:
        options = {**defaults, **options}
        key = tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in options.items()))
        if key not in cache:
            out = root / f"a{len(cache)}"
            export_artifact(ExportConfig(model=str(checkpoint), out=out, **options))
            cache[key] = out
        return cache[key]

    return export


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Callable[..., Path]:
    """export_tiny(ratio=..., stages=..., dtype=..., tokens=...) -> artifact dir, cached per argument set."""
    return _cached_exports(tmp_path_factory.mktemp("artifacts"), tiny_checkpoint, ratio=0.11, stages=2,
                           dtype="fp32", tokens=None)


def make_image(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    """A structured test image: smooth gradients plus a few solid shapes (not white noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 255
    for _ in range(4):
        x0, y0 = rng.integers(0, max(1, w - 40)), rng.integers(0, max(1, h - 40))
        base[y0:y0 + rng.integers(20, 60), x0:x0 + rng.integers(20, 60)] = rng.integers(0, 255, 3)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_qwen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apet.adapters.qwen2_5_vl.tiny import create_tiny_qwen

    return create_tiny_qwen(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_adapter(tiny_qwen_checkpoint: Path):
    """The tiny Qwen2.5-VL loaded through the real loading code (float32)."""
    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter

    return QwenAdapter.load(tiny_qwen_checkpoint)


@pytest.fixture(scope="session")
def qwen_artifact_factory(tmp_path_factory: pytest.TempPathFactory, tiny_qwen_checkpoint: Path):
    """export_qwen(ratio=..., dtype=..., tokens=...) -> tiny Qwen2.5-VL artifact dir, cached per argument set."""
    return _cached_exports(tmp_path_factory.mktemp("qwen_artifacts"), tiny_qwen_checkpoint, ratio=0.3, dtype="fp32",
                           tokens=None)


@pytest.fixture(scope="session")
def tiny_qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apet.adapters.qwen3_vl.tiny import create_tiny_qwen3

    return create_tiny_qwen3(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_adapter(tiny_qwen3_checkpoint: Path):
    """The tiny Qwen3-VL loaded through the real loading code (float32)."""
    from apet.adapters.qwen3_vl.adapter import Qwen3Adapter

    return Qwen3Adapter.load(tiny_qwen3_checkpoint)


@pytest.fixture(scope="session")
def qwen3_artifact_factory(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_checkpoint: Path):
    """export_qwen3(ratio=..., dtype=..., family_options=...) -> tiny Qwen3-VL artifact dir, cached per option set."""
    return _cached_exports(tmp_path_factory.mktemp("qwen3_artifacts"), tiny_qwen3_checkpoint, ratio=0.3,
                           dtype="fp32", tokens=None)


@pytest.fixture(scope="session")
def tiny_next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apet.adapters.llava_next.tiny import create_tiny_llava_next

    return create_tiny_llava_next(tmp_path_factory.mktemp("next") / "tiny-llava-next", seed=0)


@pytest.fixture(scope="session")
def next_artifact_factory(tmp_path_factory: pytest.TempPathFactory, tiny_next_checkpoint: Path):
    """export_next(**ExportConfig options) -> tiny LLaVA-NeXT artifact dir (fp32 unless told), cached per option set."""
    return _cached_exports(tmp_path_factory.mktemp("next_artifacts"), tiny_next_checkpoint, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_video_checkpoint() -> Path:
    """``--model tiny-video-llava``: created once in the session's isolated APET_CACHE."""
    from apet.models.registry import resolve_checkpoint

    return resolve_checkpoint("tiny-video-llava")


@pytest.fixture(scope="session")
def video_artifact_factory(tmp_path_factory: pytest.TempPathFactory, tiny_video_checkpoint: Path):
    """export_video(ratio=..., **options) -> tiny Video-LLaVA artifact dir (fp32, batch 2), cached per option set."""
    return _cached_exports(tmp_path_factory.mktemp("video_artifacts"), tiny_video_checkpoint, dtype="fp32",
                           max_batch=2)


@pytest.fixture(scope="session")
def family_artifacts(artifact_factory, qwen_artifact_factory, next_artifact_factory, video_artifact_factory,
                     qwen3_artifact_factory, internvl_artifact_factory) -> dict[str, Path]:
    """Each family's tiny artifact as the deployment tests (runtime environment, Triton) use it, shared with that
    family's own tests (exported once per run)."""
    return {"llava": artifact_factory(ratio=0.11, stages=2), "qwen2_5_vl": qwen_artifact_factory(),
            "llava-next": next_artifact_factory(tokens="32", stages=1),
            "video-llava": video_artifact_factory(ratio=0.125), "qwen3_vl": qwen3_artifact_factory(ratio=0.3),
            "internvl": internvl_artifact_factory(tokens="64", family_options={"apet-at": "after-projector"})}


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files the deployment tests send: ``image`` (PNG of make_image(3)), ``video`` (12 frames as .npy, what
    apet-run and Triton read), ``mp4`` (the same frames encoded, what apet-serve decodes), ``bad`` (PNG magic, then
    no picture)."""
    from videos import make_frames, write_video

    root = tmp_path_factory.mktemp("media")
    make_image(3).save(root / "image.png")
    frames = make_frames(5, 12, (112, 96))
    np.save(root / "clip.npy", frames)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return {"image": root / "image.png", "video": root / "clip.npy", "mp4": write_video(root / "clip.mp4", frames),
            "bad": root / "bad.png"}


@pytest.fixture(scope="session")
def tiny_internvl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-internvl``: InternVL3.5-style, a Qwen3 decoder with q/k norm."""
    from apet.adapters.internvl.tiny import create_tiny_internvl

    return create_tiny_internvl(tmp_path_factory.mktemp("internvl") / "tiny-internvl", seed=0)


@pytest.fixture(scope="session")
def internvl_artifact_factory(tmp_path_factory: pytest.TempPathFactory, tiny_internvl_checkpoint: Path):
    """export_internvl(**ExportConfig options) -> tiny InternVL artifact dir (fp32, batch 2), cached per option set."""
    return _cached_exports(tmp_path_factory.mktemp("internvl_artifacts"), tiny_internvl_checkpoint, dtype="fp32",
                           max_batch=2)


def distinct_norm_and_bias_parameters(model, seed: int = 0) -> int:
    """Give every LayerNorm's scale and shift and every 1-D constant an ``Add`` reads (the biases) its own random
    values, in place; returns how many. A tiny checkpoint's norms are ones and its biases zeros, which the exporter
    stores once under one name: a graph rewrite that wires the wrong layer's parameters would compute the same
    values there, and here it does not."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    types = {t.name: numpy_helper.to_array(t).dtype for t in model.graph.initializer if len(t.dims) == 1}
    count = 0
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            norm = node.op_type == "LayerNormalization" and index > 0
            bias = node.op_type == "Add" and len(dims.get(name, ())) == 1
            if name in types and (norm or bias):
                values = rng.standard_normal(dims[name]) * 0.5 + (1.0 if norm and index == 1 else 0.0)
                node.input[index] = f"{name}/distinct.{count}"
                model.graph.initializer.append(numpy_helper.from_array(values.astype(types[name]), node.input[index]))
                count += 1
    return count


def graphs_on_cpu(setup, failure: str | None = None, made: list | None = None):
    """``setup`` (an ONNX Runtime backend's SessionSetup) taking its CUDA-graph branches on the CPU: ONNX Runtime's CPU
    provider ignores ``enable_cuda_graph`` and ``gpu_graph_id``, so the sessions and bindings the CUDA path makes run
    here (the captures themselves run in the GPU bench). ``failure``: ``"session"``, ONNX Runtime refuses a session
    with every dim free and CUDA graphs (as it does where a node would copy between host and device); ``"capture"``,
    such a session's first run fails (a capture that fails). ``made`` collects, per session made, whether it was
    such a session."""
    from dataclasses import fields

    from apet.runtime.backends.ort_session import SessionSetup

    class FailingOnce:  # a session whose first run fails as a refused capture does
        def __init__(self, session) -> None:
            self.session, self.failed = session, False

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run_with_iobinding(self, binding, options=None):
            if not self.failed:
                self.failed = True
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA graph capture failed")
            return self.session.run_with_iobinding(binding, options)

    class Graphed(SessionSetup):
        @property
        def graphs(self) -> bool:
            return True

        def session(self, model, batch=None, weights_dir=None, shape_graphs=False, disabled_optimizers=()):
            if made is not None:
                made.append(shape_graphs)
            if shape_graphs and failure == "session":
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the CUDA Graph feature")
            session = super().session(model, batch, weights_dir, shape_graphs, disabled_optimizers)
            return FailingOnce(session) if shape_graphs and failure == "capture" else session

    return Graphed(**{f.name: getattr(setup, f.name) for f in fields(setup)})
