"""Calibration sequences for AWQ (their types: :mod:`apet.quant.calibration`): a few image+prompt pairs turned
into the LLM's input embeddings,
exactly as the deployed pipeline builds them (the family's processor and vision stages at the
export's stage-1 budget, token embeddings spliced around the visual rows).

Data: the JSONL apet-eval reads (``{"id", "image", "question", ...}``, images relative to
``--calib-images`` or the file's folder), or, without one, built-in prompts on the demo image (with a
warning: statistics from one image describe real traffic poorly).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apet.compression import selector
from apet.contracts.io import INJECTED_EMBEDS, KEEP_INDEX, VISUAL_EMBEDS
from apet.errors import ApetError, InputError
from apet.modeling.adapter import VisionLanguageAdapter
from apet.quant.calibration import CalibrationSample, CalibrationSet

log = logging.getLogger(__name__)

SYNTHETIC_PROMPTS = (
    "Describe the image in detail.",
    "What objects are visible, and what colours do they have?",
    "Is there any text in the image? If so, what does it say?",
    "Where in the image is the largest shape, and what is next to it?",
    "Write a short caption for this picture.",
    "How many distinct regions does the image have?",
    "What is in the top left corner?",
    "Answer with one word: is the image mostly bright or dark?",
)


@dataclass(frozen=True)
class CalibrationSource:
    """Where the pairs come from; validated (file readable, records well-formed) before any model loads."""

    path: Path | None = None
    images: Path | None = None
    limit: int = 8

    def pairs(self) -> tuple[list[tuple[Any, str]], dict[str, Any]]:
        """(media, prompt) pairs and the provenance recorded in the manifest."""
        from apet.media.dataset import load
        from apet.media.images import DEMO

        if self.path is None:
            log.warning("no --calib-data given: calibrating on %d built-in prompts about the demo image; pass a "
                        "JSONL of your own image+prompt pairs for weights that fit your traffic", self.limit)
            prompts = [SYNTHETIC_PROMPTS[i % len(SYNTHETIC_PROMPTS)] for i in range(self.limit)]
            return [(DEMO, p) for p in prompts], {"kind": "synthetic", "file": None, "sha256": None}
        path = Path(self.path)
        if not path.is_file():
            raise InputError(f"calibration file {path} does not exist",
                             "pass --calib-data FILE.jsonl (apet-eval's format), or omit it for synthetic prompts")
        try:
            items = load(path, "apet")
        except InputError as exc:
            raise InputError(f"calibration file {path} is not usable: {exc.what}",
                             "fix the file (one JSON object per line with id, image, question, answer)") from exc
        except (UnicodeDecodeError, OSError) as exc:
            raise InputError(f"calibration file {path} cannot be read ({exc})",
                             "pass a UTF-8 JSONL file in apet-eval's format") from exc
        if not items:
            raise InputError(f"calibration file {path} holds no records", "add image+prompt lines")
        images = Path(self.images) if self.images else path.parent
        pairs = [(images / item.image, item.question) for item in items[: self.limit]]
        missing = [str(m) for m, _ in pairs if not Path(m).is_file()]
        if missing:
            raise InputError(f"calibration image {missing[0]} does not exist ({len(missing)} missing)",
                             "pass --calib-images DIR, the folder the JSONL's image paths are relative to")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return pairs, {"kind": "file", "file": path.name, "sha256": digest}


def _media(family: Any, medium: Any) -> Any:
    """The demo image for image families; video families get it as a clip of repeated frames."""
    if getattr(family, "media", "image") == "image":
        return medium
    from PIL import Image

    from apet.media.images import DEMO, demo_image_path

    image = Image.open(demo_image_path() if medium == DEMO else medium).convert("RGB")
    return [image] * 8


@torch.no_grad()
def build_calibration(adapter: VisionLanguageAdapter, plan: Any, pairs: list[tuple[Any, str]],
                      info: dict[str, Any]) -> CalibrationSet:
    """Embed every (media, prompt) pair (from :meth:`CalibrationSource.pairs`) through the family's
    processor and vision stages at ``plan``'s stage-1 budget."""
    from apet.manifest import in_memory_manifest
    from apet.models.registry import get_family
    from apet.runtime.backends.torch import embedding_table, splice

    family = get_family(adapter.spec.family)
    dtype_name = "fp16" if adapter.dtype == torch.float16 else "fp32"
    manifest = in_memory_manifest(adapter.spec, plan, dtype=dtype_name, max_batch=1,
                                  max_context=min(adapter.spec.decoder.max_positions, 4096))
    tokenizer = adapter.source_dir if adapter.source_dir and (adapter.source_dir / "tokenizer.json").is_file() \
        else None
    processor = family.processor(tokenizer, manifest)
    stages = family.vision_stages(adapter, selector(plan.stage1))
    table = embedding_table(adapter)
    samples = []

    def to(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(adapter.device)

    for medium, prompt in pairs:
        try:
            inputs = processor.vision_inputs([_media(family, medium)])
        except ApetError as exc:
            raise InputError(f"calibration sample {medium}: {exc.what}", exc.fix) from exc
        tensors = []
        for name in stages.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(inputs.arrays[name])).to(adapter.device)
            tensors.append(tensor.to(adapter.dtype) if tensor.is_floating_point() else tensor)
        outputs = stages.named(stages(*tensors))
        visual, keep = outputs[VISUAL_EMBEDS], outputs[KEEP_INDEX]
        layout = processor.layout([prompt], inputs, keep.cpu().numpy(), 1)
        rows = to(layout.visual_rows)
        embeds = splice(table, to(layout.token_ids), visual, rows)
        injected = outputs.get(INJECTED_EMBEDS)  # families with per-layer visual inputs (DeepStack)
        samples.append(CalibrationSample(embeds, to(layout.attention_mask), to(layout.positions), injected,
                                         None if injected is None else rows))
    result = CalibrationSet(samples, dict(info))
    result.info.update(samples=len(samples), tokens=result.tokens)
    return result
