"""``apet-eval``: accuracy retention of token-selection rules and budgets on the user's data.

Predictions are appended to ``predictions.jsonl`` one line per answer (flushed and fsynced), so an
interrupted run resumes where it stopped. Each answer is keyed by a hash of its row (question, media
bytes, answers) and of its setting (artifact or model, rule, ratio, weights): a run reuses only answers
whose keys match, so an edited question, answer or image is asked again (apet/eval/keys.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tqdm.auto import tqdm

from apet.atomic import write_atomic
from apet.contracts.budget_options import check_ratios
from apet.contracts.plan import Budget, plan_for
from apet.devices import check_device
from apet.errors import ApetError, InputError, UsageError
from apet.eval.keys import RowKeys, media_digest, setting_key
from apet.eval.report import build_report, write_report
from apet.eval.scoring import prompt_for, score_item
from apet.manifest import Manifest, in_memory_manifest, read_manifest
from apet.media.dataset import EvalItem, check_sources, load
from apet.models.registry import family_of, get_family
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

if TYPE_CHECKING:
    from apet.modeling.adapter import VisionLanguageAdapter

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
    # the model-source options the user typed (CLI flags): an artifact source warns about those it ignores;
    # None (the Python API): about fields that differ from their defaults
    passed: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.methods != ("apet",):  # other rules are torch code (apet.selection): only a model source runs them
            from apet.selection import RULES

            unknown = [m for m in self.methods if m not in RULES]
            if unknown:
                raise UsageError(f"--methods {','.join(unknown)} unknown", f"use some of {', '.join(sorted(RULES))}")
        check_ratios(self.ratios)
        from apet.contracts.weights import WEIGHT_FORMATS

        bad = [w for w in self.weights if w not in WEIGHT_FORMATS]
        if bad or not self.weights:
            raise UsageError(f"--weights {','.join(self.weights)}: unknown format", "e.g. --weights fp16,int8,int4")
        check_sources(self.data, self.images)
        if (Path(self.source) / "manifest.json").is_file():
            check_device(self.device)  # an artifact runs on its backend, which checks the device itself
        else:
            from apet.modeling.devices import check_torch_device

            check_torch_device(self.device)
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


def model_manifest(adapter: "VisionLanguageAdapter", setting: Setting, stages: int) -> Manifest:
    """The manifest under which a checkpoint runs through the runtime's torch backend at one setting."""
    spec = adapter.spec
    family = get_family(spec.family)
    plan = plan_for(spec, family, Budget(ratio=setting.ratio, stages=stages, rule=setting.method), clamp_stages=True)
    return in_memory_manifest(spec, plan, dtype="fp32" if adapter.dtype.itemsize == 4 else "fp16", max_batch=1,
                              max_context=min(spec.decoder.max_positions, 4096), extra_rows=adapter.extra_row_ids())


def _pipelines(cfg: EvalConfig, agreement: dict[str, Any]) -> Iterator[tuple[Setting, Pipeline]]:
    artifact = Path(cfg.source)
    if (artifact / "manifest.json").is_file():
        manifest = read_manifest(artifact)
        setting = Setting(manifest.compression.rule, manifest.compression.ratio or 1.0, manifest.weights.format)
        ignored = ignored_options(cfg, setting, 2 if manifest.compression.stage2 is not None else 1)
        if ignored:
            log.warning("an artifact has one fixed budget, stage count and weight format (%s); %s only apply to "
                        "a model source and are ignored", setting.label, "/".join(ignored))
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


_MODEL_OPTIONS = {"--ratios": "ratios", "--methods": "methods", "--weights": "weights", "--stages": "stages",
                  "--group-size": "group_size", "--calibration": "calibration", "--calib-data": "calib_data",
                  "--calib-images": "calib_images"}


def ignored_options(cfg: EvalConfig, setting: Setting, stages: int) -> list[str]:
    """The model-source options that were set (typed on the command line, or, through the API, changed from
    their defaults) and disagree with what the artifact has: only those deserve a warning."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(EvalConfig)}
    agrees = {"ratios": cfg.ratios == (setting.ratio,), "methods": cfg.methods == (setting.method,),
              "weights": cfg.weights == (setting.weights,), "stages": cfg.stages == stages}
    out = []
    for flag, name in _MODEL_OPTIONS.items():
        given = flag in cfg.passed if cfg.passed is not None else getattr(cfg, name) != defaults[name]
        if given and not agrees.get(name, False):
            out.append(flag)
    return out


def _conditions(manifest: Manifest) -> dict[str, Any]:
    """What the scores depend on besides the rule and ratio: recorded in the report."""
    return {"prompt_template": manifest.model.prompt_template_name,
            "image_fit": manifest.model.processor.get("image_fit"),
            "basis_placement": manifest.compression.basis_placement,
            "stages": 1 if manifest.compression.stage2 is None else 2,
            "weights": manifest.weights.describe(manifest.dtype),
            "preprocessing": family_of(manifest).preprocessing_summary(manifest)}  # e.g. Qwen2.5-VL's --pixel-range


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


def _current(stored: list[dict[str, Any]], rows: dict[tuple[str, str], str]
             ) -> tuple[list[dict[str, Any]], set[tuple[str, str]], int]:
    """Stored answers minus those made for an earlier version of a row still in the data (its question,
    media or answers changed). Answers without keys (written by an apet before row keys: what they were
    made from is unknown) are counted, kept in the file and never reused; answers for rows not in this
    run's data stay in the file too (another --limit, another shard). Neither is reported."""
    kept, changed, unkeyed = [], set(), 0
    for record in stored:
        where = (record.get("benchmark"), record.get("id"))
        if "row" not in record or "setting" not in record:
            unkeyed += 1
            kept.append(record)
        elif where in rows and record["row"] != rows[where]:
            changed.add(where)
        else:
            kept.append(record)
    return kept, changed, unkeyed


def _generation_key(cfg: EvalConfig, weights: str) -> dict[str, Any]:
    """Options besides the manifest that change answers: the answer length, and how weights were quantized."""
    key: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens}
    if weights != "fp16" and not (Path(cfg.source) / "manifest.json").is_file():
        key.update(group_size=cfg.group_size, calibration=cfg.calibration,
                   calib_data=media_digest(cfg.calib_data) if cfg.calib_data else None)
    return key


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    items: list[EvalItem] = []
    for path in cfg.data:
        loaded = load(path, cfg.fmt, cfg.annotations)
        items += loaded[: cfg.limit] if cfg.limit is not None else loaded
    check_images(items, cfg.images)
    row_key = RowKeys(cfg.images)
    rows = {(i.benchmark, i.id): row_key(i) for i in items}
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / PREDICTIONS
    records, changed, unkeyed = _current(read_predictions(path), rows)
    if changed:
        log.warning("%d question(s) changed since their answers in %s (question, media or answers differ): "
                    "asking them again", len(changed), path)
    if unkeyed:
        log.warning("%d answer(s) in %s carry no row keys (an earlier apet wrote them): not reused, asked again",
                    unkeyed, path)
    # drop a truncated tail and stale answers; atomically, so a full disk or a kill here cannot lose the
    # answers already on disk
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    done = {(r["setting"], r["row"]): r for r in records if "setting" in r and "row" in r}
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    conditions: dict[str, dict[str, Any]] = {}
    agreement: dict[str, Any] = {}
    used: list[dict[str, Any]] = []
    reused = 0
    with open(path, "a", encoding="utf-8") as handle:
        for setting, pipeline in _pipelines(cfg, agreement):
            conditions[setting.label] = _conditions(pipeline.manifest)
            key = setting_key(pipeline.manifest, setting.method, setting.ratio, setting.weights,
                              _generation_key(cfg, setting.weights))
            todo = []
            for item in items:
                earlier = done.get((key, rows[(item.benchmark, item.id)]))
                if earlier is not None:
                    used.append(earlier)
                    reused += 1
                else:
                    todo.append(item)
            for item in tqdm(todo, desc=f"apet-eval {setting.label}", unit="q", disable=None):
                record = {"method": setting.method, "ratio": setting.ratio, "weights": setting.weights,
                          "benchmark": item.benchmark, "id": item.id, "type": item.type,
                          "row": rows[(item.benchmark, item.id)], "setting": key}
                try:
                    result = pipeline.generate(prompt=prompt_for(item), **{item.media: cfg.images / item.path},
                                               max_new_tokens=generation.max_new_tokens)
                    record.update(prediction=result.text.strip(), score=score_item(item, result.text))
                except ApetError as exc:  # a bad image must not stop the run; it scores 0 and is reported
                    record.update(prediction="", score=0.0, error=str(exc))
                _append(handle, record)
                used.append(record)
    report = build_report(used, items, cfg, stages_of(cfg))
    report["predictions"] = {"reused": reused, "run": len(used) - reused, "changed_rows": len(changed)}
    report["conditions"] = conditions
    if agreement:
        report["weight_agreement"] = agreement
    write_report(report, cfg.out)
    return report
