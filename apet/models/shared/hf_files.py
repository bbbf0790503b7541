"""Files of Hugging Face checkpoints every family reads or copies (torch-free)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

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


CHATML_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")  # a ChatML answer ends at <|im_end|>


def special_token_ids(source_dir: Path | None, names: Sequence[str]) -> dict[str, int]:
    """Ids of special tokens by name from the checkpoint's tokenizer.json (empty without one)."""
    if source_dir is None or not (Path(source_dir) / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(source_dir) / "tokenizer.json"))
    ids = {name: tokenizer.token_to_id(name) for name in names}
    return {name: int(i) for name, i in ids.items() if i is not None}


def chatml_eos_ids(text_eos: Any, source_dir: Path | None, fallback: tuple[int, ...]) -> tuple[int, ...]:
    """What the checkpoint's generation config declares (else ``text_eos``, its text config's), then <|im_end|> and
    <|endoftext|> where the tokenizer has them; ``fallback`` when nothing is declared anywhere."""
    generation = Path(source_dir) / "generation_config.json" if source_dir else None
    declared = read_json(generation).get("eos_token_id") if generation and generation.is_file() else None
    if declared is None:
        declared = text_eos
    ids: list[int] = []
    for value in [*(declared if isinstance(declared, list) else [declared]),
                  *special_token_ids(source_dir, CHATML_EOS_TOKENS).values()]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids) or fallback


def chat_template_source(path: Path | None) -> str | None:
    """The Jinja chat template of a checkpoint directory, from whichever file holds it."""
    if path is None:
        return None
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                template = json.loads(file.read_text()).get("chat_template")
            except (OSError, json.JSONDecodeError) as exc:
                raise ArtifactError(f"cannot read {file}: {exc}", "check the checkpoint directory") from exc
            if isinstance(template, str) and template:
                return template
    return None
