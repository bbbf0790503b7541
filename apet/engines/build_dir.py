"""``apet-build ART --out DIR``: engines for an artifact the builder may not write into.

Artifacts often sit where nothing may be written: a read-only volume, a shared model store, an image layer.
TensorRT engines belong to one GPU and one TensorRT, so they are made where the artifact is deployed, and must be
written somewhere. ``DIR`` becomes an artifact of its own: the export's files (the manifest and every file it
lists, not the source's engines) hard-linked where the filesystem allows, else symbolic links to them (never a
copy of gigabytes of weights); the engines and the build report are then built into ``DIR`` as into any artifact.
The report records the manifest's digest, so engines in ``DIR`` are refused at load if the source is re-exported
underneath a symbolic link.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from apet.atomic import place_file, replace_files
from apet.contracts.files import MANIFEST_NAME, manifest_digest
from apet.errors import StorageError, UsageError
from apet.manifest import read_manifest

log = logging.getLogger(__name__)


def check_writable(artifact: Path) -> None:
    """Refuse, before any build work, an artifact directory that cannot take the engines, with the fix (exit 6,
    as every refusal of the file system)."""
    target = os.path.realpath(artifact)
    if not os.path.isdir(target) or os.access(target, os.W_OK):
        return  # a missing artifact: reading its manifest says so
    why = "is on a read-only file system" if _read_only_fs(target) else "is not writable for this user"
    raise StorageError(f"{artifact} {why}: apet-build writes the engines beside the artifact's graphs",
                       f"build into a directory of your own: apet-build {artifact} --out DIR (DIR links the export's "
                       "files and holds the engines; run and serve DIR)")


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def build_directory(artifact: Path, out: Path) -> Path:
    """``out`` holding ``artifact``'s export, or as it is where it already holds that export (a rebuild); anything
    else there is refused, never deleted. Committed as apet-export commits (:func:`apet.atomic.replace_files`): a
    new directory in one rename, an empty one (a mount point, a symlink's target) filled with the manifest last."""
    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    if out.exists():
        if (out / MANIFEST_NAME).is_file() and manifest_digest(out) == manifest_digest(artifact):
            return out  # this export's directory from an earlier --out: build into it again
        if not out.is_dir() or any(out.iterdir()):
            raise UsageError(f"--out {out} exists and does not hold this export",
                             f"pass a new or empty directory, or apet-build {out} to rebuild the engines of the "
                             "export it holds")
    names = [*manifest.files(), MANIFEST_NAME]
    placed: dict[str, int] = {}
    with replace_files(out, last=[MANIFEST_NAME]) as stage:
        for name in names:
            how = place_file(artifact / name, stage.path / name, otherwise="symlink")
            placed[how] = placed.get(how, 0) + 1
        stage.files = names  # symbolic links included
    log.info("%s: the export of %s (%s)", out, artifact, ", ".join(f"{n} {how}" for how, n in sorted(placed.items())))
    return out


def build_target(artifact: Path, out: Path | None) -> Path:
    """Where apet-build writes: ``out`` made to hold the export (:func:`build_directory`), else the artifact itself;
    either checked writable before any build work."""
    target = build_directory(artifact, out) if out is not None else Path(artifact)
    check_writable(target)
    return target
