"""``apet-export``: a checkpoint becomes one artifact directory, written atomically (docs/architecture.md)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

from apet import __version__
from apet.atomic import SCRATCH_PREFIXES, replace_files
from apet.contracts.cache import DEFAULT_TEXT_TOKENS
from apet.contracts.compression import BASIS_PLACEMENTS, METHODS
from apet.contracts.files import BUILD_OUTPUTS, EMBEDDINGS_FILE, EMBEDDINGS_TENSOR, MANIFEST_NAME, sha256_file
from apet.contracts.io import KV_CACHE_FORMS, llm_graphs
from apet.contracts.onnx_graph import check_onnx, external_data_files, graph_io, initializer_bytes, spec_dict
from apet.contracts.plan import Budget, CompressionPlan, check_budget_options, plan_for
from apet.contracts.targets import ExportForm, resolve_form
from apet.contracts.weights import QUANT_OPSET, WeightSpec, default_method
from apet.errors import ArtifactError, StorageError, UsageError, check_range
from apet.export.llm import export_llm, export_static_llm, save_embeddings
from apet.export.vision import export_vision
from apet.manifest import SCHEMA_VERSION, GraphEntry, Manifest, in_memory_manifest, read_manifest, write_manifest
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.devices import check_torch_device
from apet.models.registry import family_of_model, get_family

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``apet-export`` takes; validated before any work starts."""

    model: str
    out: Path
    ratio: float | None = None
    stages: int | None = None  # None: the family's most (LLaVA: 2, Video-LLaVA and Qwen2.5-VL: 1)
    tokens: str | None = None
    basis: int = 10
    basis_method: str = "fps"
    seed: int | None = None
    merge: bool = True
    basis_placement: str = "paper"
    dtype: str = "fp16"
    target: str | None = None  # None: jetpack6, or trt10.15+ with attention="op" (apet.contracts.targets)
    attention: str | None = None  # None: the target's form (pattern | op)
    opset: int | None = None  # None: the form's default (17 pattern, 23 op)
    weights: str = "fp16"  # LLM weights: fp16 (as --dtype) | int8 | int4
    group_size: int | None = None  # INT4 block size (None: 128, smaller only where 128 does not divide)
    calibration: str | None = None  # rtn | awq (None: awq for int4, rtn for int8)
    calib_data: Path | None = None  # JSONL of image+prompt pairs (apet-eval's format); None: synthetic
    calib_images: Path | None = None  # folder the JSONL's image paths are relative to (default: its folder)
    calib_samples: int = 8
    keep_lm_head: bool = False  # leave the LM head in float
    max_batch: int = 4
    max_context: int | None = None
    stage2_layer: int | None = None
    all_logits: bool = False
    split_lm_head: int = 1  # the LM head as N vocabulary slices (8 GB devices)
    kv_cache: str = "dynamic"  # dynamic: llm.onnx (cache by concatenation) | static: llm_prefill + llm_decode
    overwrite: bool = False
    device: str = "cpu"
    # options the model's family declares ({"pixel-range": "checkpoint", "prompt-template": "hf", "max-views": 3};
    # apet.models.family.FamilyOption): what the user passed, checked by the family before the model loads; absent
    # ones take the family's default
    family_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> Budget:
        return Budget(ratio=self.ratio, tokens=self.tokens, stages=self.stages, basis=self.basis,
                      method=self.basis_method, merge=self.merge, seed=self.seed,
                      basis_placement=self.basis_placement, stage2_layer=self.stage2_layer)

    def __post_init__(self) -> None:
        if self.ratio is None and self.tokens is None:
            raise UsageError("no budget given", "pass --ratio R (e.g. 0.11) or --tokens K[,K2]")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is unknown", "use fp16 (engines) or fp32 (CPU parity)")
        if self.basis_method not in METHODS:
            raise UsageError(f"--basis-method {self.basis_method!r} is unknown", f"use one of {', '.join(METHODS)}")
        if self.basis_placement not in BASIS_PLACEMENTS:
            raise UsageError(f"--basis-placement {self.basis_placement!r} is unknown",
                             "use paper (the authors' algorithm, default) or own (ablation)")
        check_budget_options(self.ratio, self.tokens, self.basis)
        check_torch_device(self.device)
        spec = self.weight_spec.validate()
        form = self.form  # --target / --attention / --opset together
        if spec.quantized and form.opset < QUANT_OPSET:
            raise UsageError(f"--weights {self.weights} needs opset >= {QUANT_OPSET} (blocked DequantizeLinear, "
                             f"INT4), not --opset {self.opset}", f"drop --opset, or pass --opset {QUANT_OPSET}")
        if (self.calib_data or self.calib_images) and spec.method != "awq":
            raise UsageError("--calib-data/--calib-images are used by AWQ only",
                             "drop them, or pass --weights int4 (AWQ default) or --calibration awq")
        check_range("--calib-samples", self.calib_samples, 1, 4096)
        check_range("--max-batch", self.max_batch, 1, 256)
        check_range("--basis", self.basis, 1, 1 << 16)
        check_range("--split-lm-head", self.split_lm_head, 1, 64)
        if self.kv_cache not in KV_CACHE_FORMS:
            raise UsageError(f"--kv-cache {self.kv_cache!r} is unknown", f"use one of {', '.join(KV_CACHE_FORMS)}")
        if self.kv_cache == "static" and self.all_logits:
            raise UsageError("--all-logits is not available with --kv-cache static", "drop one of them")
        if self.split_lm_head > 1 and spec.quantized and spec.quantize_lm_head:
            raise UsageError(f"--split-lm-head {self.split_lm_head} slices a float LM head, but --weights "
                             f"{self.weights} quantizes it", "add --keep-lm-head, or drop --split-lm-head "
                             "(a quantized head is already 2-4x smaller)")
        if self.max_context is not None:
            check_range("--max-context", self.max_context, 16, 1 << 20)

    @property
    def weight_spec(self) -> WeightSpec:
        method = self.calibration or default_method(self.weights)
        return WeightSpec(format=self.weights, group_size=self.group_size, method=method,
                          quantize_lm_head=not self.keep_lm_head)

    @property
    def form(self) -> ExportForm:
        """The target's attention form and opset; quantized weights raise the default opset to theirs."""
        form = resolve_form(self.target, self.attention, self.opset)
        if self.opset is None and self.weights != "fp16" and form.opset < QUANT_OPSET:
            form = resolve_form(self.target, self.attention, QUANT_OPSET)
        return form


SCALES_FILE = "llm_awq_scales.safetensors"


def _check_out(out: Path, overwrite: bool) -> None:
    """``--overwrite`` replaces an earlier apet artifact, never a user's other files. A symlink is judged by
    its target (the link stays); an empty directory, e.g. a freshly mounted volume, needs no --overwrite."""
    existing = next((p for p in out.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise StorageError(f"--out {out} goes through {existing}, a regular file, not a directory",
                           "choose an --out whose parent folders are directories")
    target = out.resolve()
    if not target.exists():
        return
    if not target.is_dir():
        raise UsageError(f"--out {out} is a regular file, not a directory (apet-export writes a directory and "
                         "never replaces other files, even with --overwrite)",
                         "choose another --out, or remove the file first")
    if not any(not p.name.startswith(SCRATCH_PREFIXES) for p in target.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    if not (target / MANIFEST_NAME).is_file():
        raise UsageError(f"{out} is not an apet artifact (no {MANIFEST_NAME}); --overwrite only replaces artifacts "
                         "that apet-export wrote", "choose another --out (apet never deletes other files)")


def _owned(target: Path) -> set[str]:
    """The files apet may replace or delete in an existing artifact: what its manifest lists, the manifest, and
    the build outputs. A manifest that cannot be read still leaves those names."""
    names = {MANIFEST_NAME, *BUILD_OUTPUTS}
    try:
        names.update(read_manifest(target).files())
    except ArtifactError as exc:
        log.debug("previous manifest unreadable (%s); replacing only the standard names", exc)
    return names


def _report_kept(target: Path, written: set[str]) -> None:
    """Say which entries of the artifact directory apet left alone (they are not apet's)."""
    kept = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir()
                  if p.name not in written and not p.name.startswith(SCRATCH_PREFIXES))
    if kept:
        log.warning("kept %d entr%s of %s that apet does not own: %s", len(kept), "y" if len(kept) == 1 else "ies",
                    target, ", ".join(kept))


def _default_context(adapter: VisionLanguageAdapter, plan: CompressionPlan, cfg: ExportConfig) -> int:
    """2048, or the family's largest visual count plus 512 text tokens when that is more, within the model's
    positions (LLaVA-NeXT at ratio 1.0 needs ~2.9k visual tokens)."""
    probe = in_memory_manifest(adapter.spec, plan, dtype=cfg.dtype, max_batch=cfg.max_batch, max_context=0)
    visual = get_family(adapter.family).max_visual_tokens(probe)
    return min(adapter.spec.decoder.max_positions, max(2048, visual + DEFAULT_TEXT_TOKENS))


def _graph_entry(directory: Path, name: str) -> GraphEntry:
    inputs, outputs = graph_io(directory / name)
    return GraphEntry(file=name, inputs=spec_dict(inputs), outputs=spec_dict(outputs),
                      external_data=external_data_files(directory / name),
                      weight_bytes=initializer_bytes(directory / name))


def _quantize(cfg: ExportConfig, adapter: VisionLanguageAdapter, plan: CompressionPlan, pairs, info,
              scratch: Path) -> WeightSpec:
    """Quantize the LLM in place (AWQ calibrated on ``pairs``); writes the AWQ scales the torch backend
    needs to rebuild the same weights from the checkpoint."""
    from safetensors.torch import save_file

    from apet.export.calibration import build_calibration
    from apet.quant.apply import quantize_model

    spec = cfg.weight_spec
    calibration = build_calibration(adapter, plan, pairs, info) if spec.method == "awq" else None
    result = quantize_model(adapter, spec, calibration)
    spec = result.spec
    if result.scales:
        save_file({k: v.float().contiguous() for k, v in result.scales.items()}, str(scratch / SCALES_FILE))
        (scratch / SCALES_FILE).chmod(0o644)
        spec = replace(spec, scales_file=SCALES_FILE)
    gain = {k: round(1 - v["awq_loss"] / v["rtn_loss"], 4) for k, v in result.losses.items() if v["rtn_loss"] > 0}
    if gain:
        log.info("AWQ: calibration error below RTN by %.1f%% on average over %d groups",
                 100 * sum(gain.values()) / len(gain), len(gain))
    return spec


def export_artifact(cfg: ExportConfig, adapter: VisionLanguageAdapter | None = None,
                    on_step: Callable[[str], None] | None = None) -> Manifest:
    """Run the whole export into ``cfg.out``; returns the manifest written."""
    from apet.models.registry import load_adapter

    steps = ["load model", "plan budgets", "export vision.onnx", "quantize LLM weights", "export llm.onnx",
             "write embeddings", "copy tokenizer/processor", "check graphs", "checksums + manifest"]
    weights = cfg.weight_spec
    family = get_family(adapter.family) if adapter is not None else family_of_model(cfg.model)
    family_options = family.resolve_export_options(cfg.family_options)  # bad values fail before the model loads
    pairs, info = [], {}
    if weights.method == "awq":  # a missing or corrupt calibration file fails before any model loads
        from apet.export.calibration import CalibrationSource

        pairs, info = CalibrationSource(cfg.calib_data, cfg.calib_images, cfg.calib_samples).pairs()
    bar = tqdm(total=len(steps), desc="apet-export", unit="step", disable=None)

    def step(i: int) -> None:
        bar.set_postfix_str(steps[i])
        log.info("export: %s", steps[i])
        if on_step:
            on_step(steps[i])

    _check_out(cfg.out, cfg.overwrite)
    target = cfg.out.resolve()
    owned = _owned(target) if target.is_dir() else set()
    try:
        # new files are staged, then each replaces its namesake, manifest.json last (the commit point); files of
        # the previous export the new manifest does not list go after it; the user's own files stay
        with replace_files(cfg.out, last=[MANIFEST_NAME]) as stage:
            scratch = stage.path
            step(0)
            adapter = adapter or load_adapter(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
            family.apply_export_options(adapter, family_options)
            if weights.quantized:  # a group size that does not fit the model fails before any export work
                from apet.quant.apply import resolve_spec

                resolve_spec(adapter, weights)
            bar.update()
            step(1)
            spec, family = adapter.spec, get_family(adapter.family)
            plan = plan_for(spec, family, cfg.budget)
            adapter.fit_budget(plan)
            max_context = cfg.max_context or _default_context(adapter, plan, cfg)
            bar.update()
            step(2)
            form = cfg.form
            export_vision(adapter, plan.stage1, scratch / "vision.onnx", opset=form.opset, attention=form.attention)
            bar.update()
            step(3)
            if weights.quantized:
                weights = _quantize(cfg, adapter, plan, pairs, info, scratch)
            bar.update()
            step(4)
            if cfg.kv_cache == "static":
                export_static_llm(adapter, plan.stage2, scratch, opset=form.opset, max_context=max_context,
                                  attention=form.attention, lm_head_slices=cfg.split_lm_head)
            else:
                export_llm(adapter, plan.stage2, scratch / "llm.onnx", opset=form.opset, all_logits=cfg.all_logits,
                           attention=form.attention, lm_head_slices=cfg.split_lm_head)
            bar.update()
            step(5)
            extra_rows = save_embeddings(adapter, scratch / EMBEDDINGS_FILE)
            bar.update()
            step(6)
            assets = adapter.save_text_assets(scratch)
            bar.update()
            step(7)
            names = ("vision",) + llm_graphs(cfg.kv_cache)
            for name in names:
                check_onnx(scratch / f"{name}.onnx")
            graphs = {name: _graph_entry(scratch, f"{name}.onnx") for name in names}
            bar.update()
            step(8)
            manifest = _manifest(cfg, adapter, plan, graphs, assets, max_context, scratch, extra_rows, weights)
            write_manifest(scratch, manifest)
            stage.files = manifest.files() + [MANIFEST_NAME]
            stage.remove = owned - set(stage.files)
            bar.update()
    finally:
        bar.close()
    if owned:
        _report_kept(target, owned | set(stage.moved))
    return manifest


def _manifest(cfg: ExportConfig, adapter: VisionLanguageAdapter, plan: CompressionPlan,
              graphs: dict[str, GraphEntry], assets: list[str], max_context: int, directory: Path,
              extra_rows: dict[str, int], weights: WeightSpec) -> Manifest:
    rows, hidden = adapter.embed_tokens().weight.shape
    embeddings = {"kind": "safetensors", "file": EMBEDDINGS_FILE, "tensor": EMBEDDINGS_TENSOR,
                  "shape": [rows + len(extra_rows), hidden], "dtype": cfg.dtype, "extra_rows": extra_rows}
    names = [g.file for g in graphs.values()] + [x for g in graphs.values() for x in g.external_data]
    names += [EMBEDDINGS_FILE] + assets + ([weights.scales_file] if weights.scales_file else [])
    checksums = {name: sha256_file(directory / name) for name in sorted(set(names))}
    return Manifest(
        schema_version=SCHEMA_VERSION, apet_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), model=adapter.spec,
        dtype=cfg.dtype, opset=cfg.form.opset, compression=plan, max_batch=cfg.max_batch,
        max_context=max_context, graphs=graphs, embeddings=embeddings, text_assets=assets, checksums=checksums,
        weights=weights, target=cfg.form.target, attention=cfg.form.attention, kv_cache=cfg.kv_cache,
    )
