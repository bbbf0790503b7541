"""The family registry, and ``--model`` (alias, tiny name, ``*-shapes``, local directory, hub id) to a family.

A family package registers one :class:`apet.models.family.Family` instance on import
(``apet.models`` imports every built-in family); the runtime looks up the family named in a
manifest with :func:`get_family`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apet.errors import ArtifactError, UsageError
from apet.models.family import Family

if TYPE_CHECKING:
    from apet.manifest import Manifest
    from apet.modeling.adapter import VisionLanguageAdapter

log = logging.getLogger(__name__)

FAMILIES: dict[str, Family] = {}
_loaded: list[bool] = []


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


# the built-in families' packages; each registers its Family on import. Other packages add theirs through the
# ``apet.families`` entry point group (``name = "package.module"``), so adding a family edits no generic file.
BUILT_IN = ("apet.models.llava", "apet.models.llava_next", "apet.models.qwen2_5_vl", "apet.models.video_llava",
            "apet.models.qwen3_vl", "apet.models.internvl")
ENTRY_POINT_GROUP = "apet.families"


def _families() -> dict[str, Family]:
    if not _loaded:
        _loaded.append(True)
        for module in BUILT_IN:
            importlib.import_module(module)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.value not in BUILT_IN:
                entry.load()
    return FAMILIES


def families() -> dict[str, Family]:
    """Every registered family by name: the built-in ones, then those of the ``apet.families`` entry point."""
    return dict(_families())


def get_family(name: str) -> Family:
    families = _families()
    if name not in families:
        raise ArtifactError(f"model family {name!r} is not supported by this apet",
                            f"supported families: {', '.join(families)}; upgrade apet or re-export")
    return families[name]


def family_of(manifest: "Manifest") -> Family:
    """The family that exported ``manifest``'s artifact."""
    return get_family(manifest.model.family)


def known_models() -> list[str]:
    names: list[str] = []
    for family in _families().values():
        names += ([family.tiny] if family.tiny else []) + list(family.aliases) + list(family.shapes)
    return names


def family_of_checkpoint(path: Path) -> Family:
    from apet.models.shared.hf_files import read_json

    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"{path} is not a checkpoint directory (no config.json)",
                         f"pass a directory saved with save_pretrained, one of {', '.join(known_models())}, "
                         "or a hub id")
    model_type = read_json(config).get("model_type", "")
    for family in _families().values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in _families().values() for t in f.model_types)
    raise UsageError(f"model family {model_type!r} in {path} is not supported",
                     f"supported model types: {', '.join(supported)}")


def resolve_checkpoint(model: str, option: str = "--model") -> Path:
    """The local checkpoint directory ``model`` names (creating a tiny one on demand); errors name ``option``,
    the command-line option the value came from."""
    for family in _families().values():
        if model == family.tiny:
            return family.tiny_checkpoint()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    aliases = {k: v for f in _families().values() for k, v in f.aliases.items()}
    repo_id = aliases.get(model, model)
    if repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~")):
        from apet.models.hub import download_checkpoint

        return download_checkpoint(repo_id, option)
    if path.exists():
        raise UsageError(f"{option} {model!r} is a file, not a checkpoint directory",
                         "pass the directory that holds config.json and the .safetensors weights")
    raise UsageError(f"{option} {model!r} is neither a known alias nor an existing directory",
                     f"use one of {', '.join(known_models())}, a local checkpoint directory or an org/name hub id")


def family_of_model(model: str, option: str = "--model") -> Family:
    """The family ``model`` belongs to, without loading weights (a tiny or ``*-shapes`` name, or the checkpoint's
    config.json): lets a command check family options before the model loads."""
    for family in _families().values():
        if model == family.tiny or model in family.shapes:
            return family
    return family_of_checkpoint(resolve_checkpoint(model, option))


def load_adapter(model: str, *, dtype: Any = None, device: str = "cpu",
                 option: str = "--model") -> "VisionLanguageAdapter":
    """Load the adapter for ``model`` (see :func:`resolve_checkpoint`; ``*-shapes`` builds random weights;
    ``dtype`` None is float32). Needs the export extra: the family's torch half does the loading."""
    for family in _families().values():
        if model in family.shapes:
            return family.random_init(model, dtype=dtype, device=device)
    path = resolve_checkpoint(model, option)
    family = family_of_checkpoint(path)
    adapter = family.load(path, dtype=dtype, device=device)
    aliases = {k: v for f in _families().values() for k, v in f.aliases.items()}
    if model in aliases or model == family.tiny:
        adapter.spec = replace(adapter.spec, source=aliases.get(model, model))
    return adapter
