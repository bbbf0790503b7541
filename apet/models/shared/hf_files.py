"""Files of Hugging Face checkpoints every family reads or copies (torch-free)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from apet.errors import ArtifactError

TEXT_ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                    "chat_template.json", "chat_template.jinja", "generation_config.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}", "check that the checkpoint directory is complete") from exc


def require_safetensors(path: Path) -> None:
    if not list(Path(path).glob("*.safetensors")):
        raise ArtifactError(f"{path} has no .safetensors weights",
                            "convert the checkpoint to safetensors; pickled weights are never loaded")


def copy_text_assets(source_dir: Path | None, out_dir: Path) -> list[str]:
    """Copy tokenizer and processor files; the tokenizer.json (fast tokenizer) is required."""
    if source_dir is None:
        return []
    written = []
    for name in TEXT_ASSET_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
            written.append(name)
    if "tokenizer.json" not in written:
        raise ArtifactError(f"{source_dir} has no tokenizer.json",
                            "save the tokenizer with a fast tokenizer (tokenizer.save_pretrained) first")
    return written
