"""The one recipe for ONNX Runtime session options of apet's backends (torch-free): every session of the ONNX Runtime
backend, the static-KV form's decode sessions and the profiled ones are made from it, so they cannot drift.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from apet.contracts.targets import release
from apet.errors import BackendError, option

log = logging.getLogger(__name__)
CUDA_PROVIDER = "CUDAExecutionProvider"


def session_options(ort: Any, threads: int = 0, profile_prefix: Path | None = None) -> Any:
    """``SessionOptions`` with ``threads`` intra-op threads (0: ONNX Runtime's default) and, with
    ``profile_prefix``, its profiler writing there.

    Weight-only quantized graphs (DequantizeLinear -> MatMul) are fused into ORT's MatMulNBits; its CPU default
    (accuracy level 4) also quantizes the *activations* to int8. Level 1 computes in float32, so ONNX Runtime computes
    what the graph says (the weight-only model TensorRT builds)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


# The in-memory graph rewrites of the CUDA-graph sessions that are optional (each changes float16 roundings, none the
# math; docs/architecture.md): name -> what it does. The bit-identical ones (token layout, the device cast, the
# GroupQueryAttention form) are not optional.
GRAPH_REWRITES = {
    "fuse-norms": "each residual sum and the RMSNorm after it as one node, in the rewritten LLM graphs (ort_norms)",
    "pack-projections": "projections that read one activation (q/k/v, gate/up) as one MatMul and a Split, in the "
                        "rewritten LLM graphs and the graphed vision (ort_pack)",
    "vision-skip-norms": "each residual sum, bias and LayerNorm of the graphed vision as one node (ort_vision)",
    "gqa-rotary": "q and k rotated inside GroupQueryAttention from a cos/sin table, and with pack-projections fed "
                  "to it packed (ort_gqa, ort_rotary)",
    "share-weights": "the rewritten static-form graphs' large weights as inputs bound to one device buffer each, "
                     "for the prefill's and the decode's sessions alike (ort_bound_weights): one copy, not two",
    "first-token": "the vision graph, the prompt's splice and the prefill as one graph, a first token in one run "
                   "(the static form of LLaVA-1.5 and Video-LLaVA; elsewhere nothing changes; ort_first_token)",
    "flash-decode": "a kernel choice, not a graph change: GroupQueryAttention's decode steps by flash decoding, not "
                    "XQA or cuDNN (ONNX Runtime's environment switches FLASH_DECODE_ENVIRONMENT, set only while the "
                    "decode sessions are made)",
}
DEFAULT_REWRITES: frozenset[str] = frozenset({"fuse-norms", "pack-projections", "gqa-rotary", "first-token"})  # what
# the H200 measured to pay off with the same kept indices (docs/benchmarks.md: h200-rewrites/, h200-gqa-rotary/,
# h200-first-token/: first-token's outputs bit-equal to the two sessions', 0.9 ms off the 7B first token)
# ONNX Runtime's GroupQueryAttention picks its decode kernel from switches only its environment sets, read when a
# session's kernels are made: XQA by default; with XQA off another (on Hopper possibly cuDNN's attention); with
# cuDNN's off too, flash decoding. XQA off took 0.2 ms off the 7B decode step on the H200 but its logits moved
# between two runs (docs/benchmarks.md, h200-first-token/), so flash-decode pins the flash kernel, not whichever
# comes next
FLASH_DECODE_ENVIRONMENT: dict[str, str] = {"ORT_ENABLE_XQA": "0", "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"}
FUSED_NORMS = frozenset({"fuse-norms", "vision-skip-norms"})  # the rewrites that make Skip(Simplified)LayerNorm nodes
# ONNX Runtime 1.31.1's CUDA kernels of those nodes take mean and variance in float32, as precise as the nodes they
# replace (scripts/ort_norm_precision.py on the H200); older releases took them in float16 unless told otherwise
FLOAT32_NORM_STATISTICS_SINCE = (1, 31)
STRICT_NORM_OPTION = "enable_skip_layer_norm_strict_mode"  # the CUDA provider's float32 (Welford) fused norms


def cuda_provider(rewrites: frozenset[str] = frozenset(), onnxruntime_version: str = "") -> tuple[str, dict[str, str]]:
    """The CUDA execution provider with apet's options: ApET's float32 math must not run in TF32 (as coarse as
    fp16; the provider enables it by default); convolutions (the patch embeddings) take cuDNN's heuristic
    algorithm, as torch does by default (``cudnn.benchmark`` off), not the one the provider times fastest when a
    session starts, which can differ between machines and runs and so move float16 roundings that ApET's merge
    near-ties read (docs/benchmarks.md, "Prefill attention": an H200 run whose vision graph merged 11 of 96
    tokens another way); and the fused norms of ``rewrites`` in strict mode on an ONNX Runtime older than
    :data:`FLOAT32_NORM_STATISTICS_SINCE` (or of a version that does not parse), so no release computes them less
    precisely than the nodes they replace."""
    options = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    if rewrites & FUSED_NORMS and release(onnxruntime_version) < FLOAT32_NORM_STATISTICS_SINCE:
        options[STRICT_NORM_OPTION] = "1"
    return CUDA_PROVIDER, options


def graph_rewrites(names: str | Iterable[str] | None) -> frozenset[str]:
    """``names`` (a comma list or names; None or "default": :data:`DEFAULT_REWRITES`, also as one name of a list, as in
    "default,gqa-rotary"; "none" or "": none) -> the set, or a ValueError naming the unknown one and the known ones."""
    if names is None:
        return DEFAULT_REWRITES
    named = _named(names)
    chosen = (named - {"default"}) | (DEFAULT_REWRITES if "default" in named else frozenset())
    unknown = sorted(chosen - set(GRAPH_REWRITES))
    if unknown:
        raise ValueError(f"unknown ONNX Runtime graph rewrite {unknown[0]!r} (known: {', '.join(GRAPH_REWRITES)}; "
                         "or default, none)")
    return chosen


def names_itself(names: str | Iterable[str] | None, rewrite: str) -> bool:
    """Whether ``names`` (as :func:`graph_rewrites` takes them) asks for ``rewrite`` by its own name, not only through
    "default": a rewrite asked for by name warns where it does not apply; one that came with the default logs it."""
    return names is not None and rewrite in _named(names)


def _named(names: str | Iterable[str]) -> frozenset[str]:
    """The names as given (a comma list, "none" or "" for none, or names), "default" not yet expanded."""
    if isinstance(names, str):
        return frozenset() if names == "none" else frozenset(n.strip() for n in names.split(",") if n.strip())
    return frozenset(names)


@contextlib.contextmanager
def scoped_environment(variables: Mapping[str, str]) -> Iterator[None]:
    """``variables`` in the process environment while the block runs (a session made in it reads them), then as
    they were; a variable the user set already keeps the user's value (theirs is the deliberate choice)."""
    added = {name: value for name, value in variables.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def load_cuda_libraries(ort: Any) -> None:
    """CUDA and cuDNN for the CUDA execution provider from the nvidia-* wheels where the system has none (a host with
    pip-installed CUDA; a Jetson's JetPack libraries load by their default paths either way). Without it a process
    that never imported torch (the torch-free runtime) could not load them, and ONNX Runtime would fall back to its
    CPU provider. ``preload_dlls`` reports what it could not load by printing: that goes to the log, not to the
    standard output a user may be piping generated text from."""
    if not hasattr(ort, "preload_dlls"):  # releases before 1.21 load by the default paths only
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except Exception as err:  # noqa: BLE001 - the session's provider check reports what is really missing
        log.info("onnxruntime.preload_dlls: %s", err)
    if printed.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", printed.getvalue().strip())


def check_provider(session: Any, wanted: str) -> None:
    """ONNX Runtime falls back to its CPU provider, with a warning only, where the CUDA provider cannot load (CUDA or
    cuDNN missing): a 7B model would then run on the CPU for minutes. Refuse that instead."""
    got = session.get_providers()
    if wanted == CUDA_PROVIDER and (not got or got[0] != CUDA_PROVIDER):
        raise BackendError(f"ONNX Runtime could not start its CUDA execution provider (the session runs on {got}): "
                           "its CUDA or cuDNN libraries did not load (ONNX Runtime's log above says which)",
                           "install the CUDA and cuDNN your onnxruntime-gpu was built for (JetPack on a Jetson; "
                           "pip install 'onnxruntime-gpu[cuda,cudnn]' elsewhere), or pass "
                           f"{option('device', 'cpu')}")
