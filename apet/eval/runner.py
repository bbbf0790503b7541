"""``apet-eval``: accuracy retention of token-selection rules and budgets on the user's data.

Predictions are appended to ``predictions.jsonl`` one line per answer (flushed and fsynced), so an
interrupted run resumes where it stopped: answered (method, ratio, id) triples are skipped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from apet.atomic import write_atomic
from apet.contracts.budget_options import check_ratios
from apet.devices import check_device
from apet.errors import ApetError, InputError, UsageError
from apet.eval.data import EvalItem, check_sources, load
from apet.eval.report import build_report, write_report
from apet.eval.scoring import prompt_for, score_item
from apet.manifest import Manifest, in_memory_manifest, read_manifest
from apet.models.adapter import VisionLanguageAdapter
from apet.models.registry import get_family
from apet.plan import plan_compression
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig
from apet.selection import RULES

log = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    source: str  # artifact directory, or a model (tiny, alias, checkpoint directory)
    data: tuple[Path, ...]
    images: Path  # the directory media paths (images or videos) are relative to
    out: Path
    ratios: tuple[float, ...] = (1.0, 0.22, 0.11)
    methods: tuple[str, ...] = ("apet",)
    stages: int = 1
    fmt: str = "apet"
    annotations: Path | None = None
    backend: str = "auto"
    device: str = "cpu"
    limit: int | None = None
    max_new_tokens: int = 16
    weights: tuple[str, ...] = ("fp16",)  # model sources: LLM weight formats to compare (fp16 = the reference)
    group_size: int | None = None
    calibration: str | None = None  # rtn | awq (None: awq for int4, rtn for int8)
    calib_data: Path | None = None
    calib_images: Path | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in RULES]
        if unknown:
            raise UsageError(f"--methods {','.join(unknown)} unknown", f"use some of {', '.join(sorted(RULES))}")
        check_ratios(self.ratios)
        from apet.quant.spec import WEIGHT_FORMATS

        bad = [w for w in self.weights if w not in WEIGHT_FORMATS]
        if bad or not self.weights:
            raise UsageError(f"--weights {','.join(self.weights)}: unknown format", "e.g. --weights fp16,int8,int4")
        check_sources(self.data, self.images)
        check_device(self.device)
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit {self.limit} must be at least 1", "pass --limit N to run the first N "
                             "questions of each file, or leave it out to run all")


@dataclass(frozen=True)
class Setting:
    method: str
    ratio: float
    weights: str = "fp16"

    @property
    def label(self) -> str:
        base = "full" if self.ratio == 1.0 else f"{self.method}@{self.ratio:g}"
        return base if self.weights == "fp16" else f"{base}/{self.weights}"


def settings(cfg: EvalConfig) -> list[Setting]:
    """Every method at every ratio < 1, plus one uncompressed run (the retention denominator)."""
    out = [Setting("apet", 1.0)] if 1.0 in cfg.ratios else []
    return out + [Setting(m, r) for m in cfg.methods for r in cfg.ratios if r < 1.0]


def model_manifest(adapter: VisionLanguageAdapter, setting: Setting, stages: int) -> Manifest:
    """The manifest under which a checkpoint runs through the runtime's torch backend at one setting."""
    spec = adapter.spec
    family = get_family(spec.family)
    plan = plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=setting.ratio,
                            stages=min(stages, family.max_stages), stage1_placement=family.stage1_placement,
                            rule=setting.method, per_image=family.dynamic_tokens)
    return in_memory_manifest(spec, plan, dtype="fp32" if adapter.dtype.itemsize == 4 else "fp16", max_batch=1,
                              max_context=min(spec.decoder.max_positions, 4096), extra_rows=adapter.extra_row_ids())


def _pipelines(cfg: EvalConfig, agreement: dict[str, Any]) -> Iterator[tuple[Setting, Pipeline]]:
    artifact = Path(cfg.source)
    if (artifact / "manifest.json").is_file():
        manifest = read_manifest(artifact)
        setting = Setting(manifest.compression.rule, manifest.compression.ratio or 1.0, manifest.weights.format)
        if cfg.ratios != (setting.ratio,) or cfg.methods != ("apet",) or cfg.weights != ("fp16",):
            log.warning("an artifact has one fixed budget and weight format (%s); --ratios/--methods/--weights "
                        "are ignored", setting.label)
        yield setting, Pipeline.load(artifact, backend=cfg.backend, device=cfg.device)
        return
    import torch

    from apet.models.registry import load_adapter
    from apet.runtime.backends.torch import TorchBackend

    dtype = torch.float16 if cfg.device.startswith("cuda") else torch.float32
    adapter = load_adapter(cfg.source, dtype=dtype, device=cfg.device)
    if adapter.source_dir is None:
        raise UsageError(f"{cfg.source} has no tokenizer files", "pass a checkpoint directory or an artifact")
    for fmt in cfg.weights:
        model, spec = adapter, None
        if fmt != "fp16":
            from apet.eval.weights import quantized_copy

            model, spec, agreement[fmt] = quantized_copy(adapter, fmt, cfg)
        for setting in settings(cfg):
            setting = Setting(setting.method, setting.ratio, fmt)
            manifest = model_manifest(model, setting, cfg.stages)
            if spec is not None:
                manifest = replace(manifest, weights=spec)
            backend = TorchBackend(adapter.source_dir, manifest, device=cfg.device, adapter=model)
            yield setting, Pipeline(adapter.source_dir, manifest, backend)
        if model is not adapter:
            del model


def _conditions(manifest: Manifest) -> dict[str, Any]:
    """What the scores depend on besides the rule and ratio: recorded in the report."""
    return {"prompt_template": manifest.model.prompt_template_name,
            "image_fit": manifest.model.processor.get("image_fit"),
            "basis_placement": manifest.compression.basis_placement,
            "stages": 1 if manifest.compression.stage2 is None else 2,
            "weights": manifest.weights.describe(manifest.dtype)}


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Answered records; a line cut short by a kill is dropped (and rewritten on resume)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("dropping a truncated line of %s", path)
    return records


def _append(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def check_images(items: list[EvalItem], images: Path) -> None:
    """Every question's medium must exist before the run starts: a missing one is a data error, not a 0 score
    (a video may be a file or a directory of frames)."""
    missing = sorted({i.path for i in items if not (images / i.path).exists()
                      or (not i.video and not (images / i.path).is_file())})
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{len(missing)} image(s)/video(s) the data refers to are not under --images {images}: "
                         f"{shown}",
                         "pass the folder the data's image paths are relative to as --images, or fix the data file")


def stages_of(cfg: EvalConfig) -> int:
    """An artifact has its own stage count; --stages applies to a model source only."""
    artifact = Path(cfg.source)
    if (artifact / "manifest.json").is_file():
        return 2 if read_manifest(artifact).compression.stage2 is not None else 1
    return cfg.stages


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    items: list[EvalItem] = []
    for path in cfg.data:
        loaded = load(path, cfg.fmt, cfg.annotations)
        items += loaded[: cfg.limit] if cfg.limit is not None else loaded
    check_images(items, cfg.images)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / PREDICTIONS
    records = read_predictions(path)
    # drop a truncated tail; atomically, so a full disk or a kill here cannot lose the answers already on disk
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    done = {(r["method"], r["ratio"], r.get("weights", "fp16"), r["benchmark"], r["id"]) for r in records}
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    conditions: dict[str, dict[str, Any]] = {}
    agreement: dict[str, Any] = {}
    with open(path, "a", encoding="utf-8") as handle:
        for setting, pipeline in _pipelines(cfg, agreement):
            conditions[setting.label] = _conditions(pipeline.manifest)
            todo = [i for i in items
                    if (setting.method, setting.ratio, setting.weights, i.benchmark, i.id) not in done]
            for item in tqdm(todo, desc=f"apet-eval {setting.label}", unit="q", disable=None):
                record = {"method": setting.method, "ratio": setting.ratio, "weights": setting.weights,
                          "benchmark": item.benchmark, "id": item.id, "type": item.type}
                try:
                    result = pipeline.generate(prompt=prompt_for(item), **{item.media: cfg.images / item.path},
                                               max_new_tokens=generation.max_new_tokens)
                    record.update(prediction=result.text.strip(), score=score_item(item, result.text))
                except ApetError as exc:  # a bad image must not stop the run; it scores 0 and is reported
                    record.update(prediction="", score=0.0, error=str(exc))
                _append(handle, record)
                records.append(record)
    report = build_report(records, items, cfg, stages_of(cfg))
    report["conditions"] = conditions
    if agreement:
        report["weight_agreement"] = agreement
    write_report(report, cfg.out)
    return report
