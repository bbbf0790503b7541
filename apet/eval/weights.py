"""apet-eval ``--weights``: a quantized copy of the model per format, and its agreement with fp16.

The copy is quantized exactly as ``apet-export --weights`` would (same RTN/AWQ code, AWQ calibrated on
``--calib-data`` or the synthetic prompts), so the task scores are those of the exported graphs.
Agreement is measured teacher-forced on the eval questions themselves at ratio 1.0 (no token
compression: the number isolates what quantization changes).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from apet.contracts.plan import Budget, plan_for
from apet.contracts.weights import WeightSpec, default_method
from apet.eval.scoring import prompt_for
from apet.media.dataset import load
from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.registry import get_family

log = logging.getLogger(__name__)
AGREEMENT_PROMPTS = 32  # eval questions used for agreement (teacher forcing costs new_tokens full forwards each)

_reference_cache: dict[int, Any] = {}


def _full_plan(adapter: VisionLanguageAdapter):
    spec = adapter.spec
    return plan_for(spec, get_family(spec.family), Budget(ratio=1.0, stages=1))


def _sequences(adapter: VisionLanguageAdapter, cfg: Any):
    """The eval prompts extended by fp16's greedy answers (computed once per run, embeddings only)."""
    from apet.export.calibration import build_calibration
    from apet.quant.agreement import teacher_forced_sequences

    key = id(adapter)
    if key not in _reference_cache:
        items = [item for path in cfg.data for item in load(path, cfg.fmt, cfg.annotations)][:AGREEMENT_PROMPTS]
        if cfg.limit:
            items = items[: cfg.limit]
        pairs = [(cfg.images / item.image, prompt_for(item)) for item in items]
        samples = build_calibration(adapter, _full_plan(adapter), pairs, {}).samples
        _reference_cache.clear()
        _reference_cache[key] = teacher_forced_sequences(adapter, samples, cfg.max_new_tokens)
    return _reference_cache[key]


def quantized_copy(adapter: VisionLanguageAdapter, fmt: str, cfg: Any) -> tuple[VisionLanguageAdapter, WeightSpec,
                                                                                   dict[str, Any]]:
    """(quantized deep copy, its resolved spec, its agreement with ``adapter`` as JSON)."""
    from apet.export.calibration import CalibrationSource, build_calibration
    from apet.quant.agreement import agreement
    from apet.quant.apply import quantize_model

    spec = WeightSpec(fmt, cfg.group_size if fmt == "int4" else None, cfg.calibration or default_method(fmt))
    sequences = _sequences(adapter, cfg)
    model = copy.deepcopy(adapter)
    calibration = None
    if spec.method == "awq":
        pairs, info = CalibrationSource(cfg.calib_data, cfg.calib_images).pairs()
        calibration = build_calibration(model, _full_plan(model), pairs, info)
    result = quantize_model(model, spec, calibration)
    score = agreement(adapter, model, sequences)
    log.info("%s vs fp16: top-1 agreement %.4f, mean KL %.5f over %d positions", fmt, score.top1, score.kl,
             score.positions)
    dtype = str(adapter.dtype).replace("torch.float", "fp")  # the manifest's names: fp16 / fp32
    return model, result.spec, {**score.to_json(), "weights": result.spec.describe(dtype), **result.summary()}
