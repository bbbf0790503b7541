"""``apet-export``: a checkpoint becomes one artifact directory, written atomically (DESIGN §3)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from apet import __version__
from apet.atomic import atomic_directory
from apet.compression import BASIS_PLACEMENTS, METHODS
from apet.contracts.files import EMBEDDINGS_FILE, EMBEDDINGS_TENSOR, sha256_file
from apet.errors import UsageError, check_range
from apet.export.llm import export_llm, save_embeddings
from apet.export.onnx_utils import MAX_OPSET, MIN_OPSET, check_onnx, external_data_files, graph_io, spec_dict
from apet.export.vision import export_vision
from apet.manifest import SCHEMA_VERSION, GraphEntry, Manifest, write_manifest
from apet.models.adapter import VisionLanguageAdapter
from apet.models.registry import get_family
from apet.plan import CompressionPlan, plan_compression

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``apet-export`` takes; validated before any work starts."""

    model: str
    out: Path
    ratio: float | None = None
    stages: int | None = None  # None: the family's default (2 where a second stage exists)
    tokens: str | None = None
    basis: int = 10
    basis_method: str = "fps"
    seed: int | None = None
    merge: bool = True
    basis_placement: str = "paper"
    image_fit: str | None = None  # None: the family's default (LLaVA-1.5: pad)
    prompt_template: str | None = None  # None: the family's default (LLaVA-1.5: vicuna_v1)
    dtype: str = "fp16"
    opset: int = 17
    max_batch: int = 4
    max_context: int | None = None
    stage2_layer: int | None = None
    all_logits: bool = False
    split_lm_head: int = 1  # the LM head as N vocabulary slices (8 GB devices)
    overwrite: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.ratio is None and self.tokens is None:
            raise UsageError("no budget given", "pass --ratio R (e.g. 0.11) or --tokens K[,K2]")
        if self.ratio is not None:
            if not (0.0 < self.ratio <= 1.0):
                raise UsageError(f"--ratio {self.ratio} is outside the allowed range (0, 1]",
                                 "pass the mean retained fraction, e.g. --ratio 0.11")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is unknown", "use fp16 (engines) or fp32 (CPU parity)")
        if self.basis_method not in METHODS:
            raise UsageError(f"--basis-method {self.basis_method!r} is unknown", f"use one of {', '.join(METHODS)}")
        if self.basis_placement not in BASIS_PLACEMENTS:
            raise UsageError(f"--basis-placement {self.basis_placement!r} is unknown",
                             "use paper (the authors' algorithm, default) or own (ablation)")
        check_range("--opset", self.opset, MIN_OPSET, MAX_OPSET)
        check_range("--max-batch", self.max_batch, 1, 256)
        check_range("--basis", self.basis, 1, 1 << 16)
        check_range("--split-lm-head", self.split_lm_head, 1, 64)
        if self.max_context is not None:
            check_range("--max-context", self.max_context, 16, 1 << 20)


def default_max_context(max_positions: int, visual_tokens: int) -> int:
    """KV-cache capacity when not given: 2048, or room for the largest visual span plus 1024 text tokens
    (dynamic-resolution images can keep thousands), within the model's positions."""
    return min(max_positions, max(2048, -(-(visual_tokens + 1024) // 256) * 256))


def _graph_entry(directory: Path, name: str) -> GraphEntry:
    inputs, outputs = graph_io(directory / name)
    return GraphEntry(file=name, inputs=spec_dict(inputs), outputs=spec_dict(outputs),
                      external_data=external_data_files(directory / name))


def export_artifact(cfg: ExportConfig, adapter: VisionLanguageAdapter | None = None,
                    on_step: Callable[[str], None] | None = None) -> Manifest:
    """Run the whole export into ``cfg.out``; returns the manifest written."""
    from apet.models.registry import load_adapter

    steps = ["load model", "plan budgets", "export vision.onnx", "export llm.onnx", "write embeddings",
             "copy tokenizer/processor", "check graphs", "checksums + manifest"]
    bar = tqdm(total=len(steps), desc="apet-export", unit="step", disable=None)

    def step(i: int) -> None:
        bar.set_postfix_str(steps[i])
        log.info("export: %s", steps[i])
        if on_step:
            on_step(steps[i])

    try:
        with atomic_directory(cfg.out, cfg.overwrite) as scratch:
            step(0)
            adapter = adapter or load_adapter(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
            adapter.customize(image_fit=cfg.image_fit, prompt_template=cfg.prompt_template)
            bar.update()
            step(1)
            spec, family = adapter.spec, get_family(adapter.family)
            if cfg.stages is not None and cfg.stages > family.max_stages:
                raise UsageError(f"--stages {cfg.stages}: the {family.name} family has {family.max_stages} stage(s)",
                                 f"pass --stages {family.max_stages}")
            stages = min(2, family.max_stages) if cfg.stages is None else cfg.stages
            plan = plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=cfg.ratio, stages=stages,
                                    tokens=cfg.tokens, basis=cfg.basis, method=cfg.basis_method, merge=cfg.merge,
                                    seed=cfg.seed, basis_placement=cfg.basis_placement,
                                    stage1_placement=family.stage1_placement, stage2_layer=cfg.stage2_layer,
                                    per_image=family.dynamic_tokens)
            adapter.fit_budget(plan)
            max_context = cfg.max_context or default_max_context(spec.decoder.max_positions, plan.stage1_keep)
            bar.update()
            step(2)
            export_vision(adapter, plan.stage1, scratch / "vision.onnx", opset=cfg.opset)
            bar.update()
            step(3)
            export_llm(adapter, plan.stage2, scratch / "llm.onnx", opset=cfg.opset, all_logits=cfg.all_logits,
                       lm_head_slices=cfg.split_lm_head)
            bar.update()
            step(4)
            extra_rows = save_embeddings(adapter, scratch / EMBEDDINGS_FILE)
            bar.update()
            step(5)
            assets = adapter.save_text_assets(scratch)
            bar.update()
            step(6)
            for name in ("vision.onnx", "llm.onnx"):
                check_onnx(scratch / name)
            graphs = {"vision": _graph_entry(scratch, "vision.onnx"), "llm": _graph_entry(scratch, "llm.onnx")}
            bar.update()
            step(7)
            manifest = _manifest(cfg, adapter, plan, graphs, assets, max_context, scratch, extra_rows)
            write_manifest(scratch, manifest)
            bar.update()
    finally:
        bar.close()
    return manifest


def _manifest(cfg: ExportConfig, adapter: VisionLanguageAdapter, plan: CompressionPlan,
              graphs: dict[str, GraphEntry], assets: list[str], max_context: int, directory: Path,
              extra_rows: dict[str, int]) -> Manifest:
    rows, hidden = adapter.embed_tokens().weight.shape
    embeddings = {"kind": "safetensors", "file": EMBEDDINGS_FILE, "tensor": EMBEDDINGS_TENSOR,
                  "shape": [rows + len(extra_rows), hidden], "dtype": cfg.dtype, "extra_rows": extra_rows}
    names = [g.file for g in graphs.values()] + [x for g in graphs.values() for x in g.external_data]
    names += [EMBEDDINGS_FILE] + assets
    checksums = {name: sha256_file(directory / name) for name in sorted(set(names))}
    return Manifest(
        schema_version=SCHEMA_VERSION, apet_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), model=adapter.spec,
        dtype=cfg.dtype, opset=cfg.opset, compression=plan, max_batch=cfg.max_batch,
        max_context=max_context, graphs=graphs, embeddings=embeddings, text_assets=assets, checksums=checksums,
    )
