"""Build TensorRT / TensorRT-RTX engines from ONNX: strongly typed, with optimization profiles.

Written against the ``tensorrt`` API; :mod:`apet.engines.api` hides the few
differences of TensorRT-RTX, so the same code path builds on a Jetson, on a
desktop GPU and ahead-of-time on a CPU-only CI machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from apet.engines.api import TrtApi
from apet.engines.layer_counts import parsed_layers_by_stage
from apet.errors import ArtifactError, BackendError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: for every dynamic input, (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings common to every engine of an artifact."""

    workspace_mb: int | None = None
    optimization_level: int | None = None
    compute_capabilities: tuple[str, ...] = ()
    timing_cache: Path | None = None
    detailed_profiling: bool = True


@dataclass
class BuiltEngine:
    """A serialized engine plus what the report needs about it."""

    plan: bytes
    seconds: float
    num_layers: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profiles: list[dict[str, Any]]
    compute_capabilities: list[str] = field(default_factory=list)
    fused_layers: dict[str, int] = field(default_factory=dict)  # see fused_layer_counts
    parsed_layers: dict[str, int] = field(default_factory=dict)  # per stage, apet.engines.layer_counts


class _Logger:
    """Route TensorRT's log through :mod:`logging` (created per flavour: the base class differs)."""

    @staticmethod
    def create(api: TrtApi) -> Any:
        trt = api.module

        class Logger(trt.ILogger):  # type: ignore[name-defined, misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(msg.strip())  # surfaced in the ApetError we raise
                    log.debug("TensorRT error: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.debug("TensorRT warning: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        return Logger()


def _progress_monitor(api: TrtApi, callback: Callable[[str, int, int], None] | None,
                      cancelled: Callable[[], bool] | None = None) -> Any:
    """An IProgressMonitor forwarding (phase, step, steps) to ``callback``; returning False from
    ``step_complete`` is TensorRT's way to cancel a build, done when ``cancelled()``. None if unsupported."""
    base = getattr(api.module, "IProgressMonitor", None)
    if base is None:
        return None

    def report(phase: str, step: int, steps: int) -> None:
        if callback is not None:
            callback(phase, step, steps)

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.phases: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases[phase_name] = num_steps
            report(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            report(phase_name, step + 1, self.phases.get(phase_name, 0))
            return not (cancelled is not None and cancelled())

        def phase_finish(self, phase_name: str) -> None:
            steps = self.phases.get(phase_name, 0)
            report(phase_name, steps, steps)

    return Monitor()


def parse_onnx(api: TrtApi, onnx_path: Path) -> tuple[Any, Any, Any, Any]:
    """Parse into a strongly typed network; parser failures name the node, op and message."""
    trt = api.module
    logger = _Logger.create(api)
    builder = trt.Builder(logger)
    network = builder.create_network(api.strongly_typed_flags())
    parser = trt.OnnxParser(network, logger)
    if not Path(onnx_path).is_file():
        raise ArtifactError(f"{onnx_path} does not exist", "run apet-export first, or point at the artifact directory")
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            problems.append(f"node {error.node_name() or error.node()!s} ({error.node_operator()}): {error.desc()}")
        detail = logger.errors[-1].splitlines()[-1] if logger.errors else ""
        raise ArtifactError(
            f"{api.kind} {api.version} cannot parse {Path(onnx_path).name}: " + "; ".join(problems)
            + (f" [{detail}]" if detail else ""),
            "the graph uses an op or pattern this TensorRT does not support; re-export for it with "
            "apet-export --target (jetpack6: pattern attention, opset 17, parses on every TensorRT) or "
            "--attention pattern, or report the node named above",
        )
    return builder, network, parser, logger


def parse_layer_counts(api: TrtApi, onnx_path: Path) -> dict[str, int]:
    """Parse ``onnx_path`` (no build) and count its layers per stage (:mod:`apet.engines.layer_counts`)."""
    _builder, network, _parser, _logger = parse_onnx(api, onnx_path)
    return parsed_layers_by_stage(network)


# layer types TensorRT creates for the ONNX ops of --attention op (absent from TensorRT 10.3's LayerType)
_FUSED_TYPES = {"ATTENTION_INPUT": "attention_input", "ATTENTION_OUTPUT": "attention_output",
                "ROTARY_EMBEDDING": "rotary_embedding", "KV_CACHE_UPDATE": "kv_cache_update"}


def fused_layer_counts(api: TrtApi, network: Any) -> dict[str, int]:
    """How many attention (input/output pairs), rotary-embedding and KV-cache-update layers the parsed
    network holds: what a user checks to see that the importer kept attention fused. A pattern-form graph
    shows none here; whether the builder fuses its MatMul-Softmax-MatMul shows only in the engine's layers."""
    members = api.module.LayerType.__members__
    wanted = {members[name]: key for name, key in _FUSED_TYPES.items() if name in members}
    counts = {key: 0 for key in _FUSED_TYPES.values()}
    for i in range(network.num_layers):
        key = wanted.get(network.get_layer(i).type)
        if key is not None:
            counts[key] += 1
    counts["attention"] = min(counts["attention_input"], counts["attention_output"])
    return counts


def _io_specs(network: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]

    def describe(t: Any) -> dict[str, Any]:
        return {"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1].lower()}

    return [describe(t) for t in inputs], [describe(t) for t in outputs]


def build_engine(
    api: TrtApi,
    onnx_path: Path,
    profiles: Sequence[Profile],
    options: BuildOptions = BuildOptions(),
    progress: Callable[[str, int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> BuiltEngine:
    """Parse ``onnx_path`` and build a serialized engine with ``profiles``.

    ``cancelled`` is polled at every builder step; when it turns true the build stops and
    KeyboardInterrupt is raised (see :mod:`apet.interrupts` for why it is polled, not raised).
    """
    trt = api.module
    builder, network, _parser, logger = parse_onnx(api, onnx_path)
    config = builder.create_builder_config()
    # ApET's float32 Gram system, projections and merging must not drop to TF32 (10-bit mantissa, as
    # ill-conditioned as fp16); every other layer of the strongly typed network is fp16 anyway.
    config.clear_flag(trt.BuilderFlag.TF32)
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    if options.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    targets = api.set_compute_capabilities(config, list(options.compute_capabilities))
    cache = None
    if options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = api.attach_timing_cache(config, blob)
    monitor = _progress_monitor(api, progress, cancelled) if progress or cancelled else None
    if monitor is not None:
        config.progress_monitor = monitor

    input_names = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        unknown = set(profile.shapes) - input_names
        if unknown:
            raise ArtifactError(f"profile {profile.name!r} names inputs the graph lacks: {sorted(unknown)}",
                                "re-export the artifact; the manifest and the ONNX graph disagree")
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if cancelled is not None and cancelled():
        raise KeyboardInterrupt(f"build of {Path(onnx_path).name} cancelled")
    if plan is None:
        detail = "; ".join(logger.errors[-3:]) or "no message"
        raise BackendError(f"{api.kind} failed to build {Path(onnx_path).name}: {detail}",
                           "run with --verbose for the builder log; try a smaller --max-context or more --workspace")
    if cache is not None and options.timing_cache is not None:
        options.timing_cache.write_bytes(bytes(cache.serialize()))
    inputs, outputs = _io_specs(network)
    return BuiltEngine(
        plan=bytes(plan), seconds=seconds, num_layers=int(network.num_layers), inputs=inputs, outputs=outputs,
        profiles=[p.to_json() for p in profiles], compute_capabilities=targets,
        fused_layers=fused_layer_counts(api, network), parsed_layers=parsed_layers_by_stage(network),
    )
