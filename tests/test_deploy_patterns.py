"""Where artifacts are deployed (issue 26, items 1-3 and 7): --overwrite replaces only apet's files, a symlinked
artifact is updated through its link, a mount point is never renamed, an empty directory is a valid --out, and
a reader running during replacements gets the old files, the new files, or the retryable ArtifactChangedError.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import small_fs
from small_fs import q

from apet.contracts.files import BUILD_OUTPUTS, MANIFEST_NAME, REPORT_NAME
from apet.errors import ArtifactChangedError
from apet.manifest import read_manifest, sign

NO_REAL_FS = small_fs.available()
needs_fs = pytest.mark.skipif(NO_REAL_FS is not None, reason=f"private mounts unavailable: {NO_REAL_FS}")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apet.cli", *args], capture_output=True, text=True, timeout=timeout)


def _user_files(directory: Path) -> dict[str, bytes]:
    """What a user keeps beside the engines: notes, and a trtexec run's results."""
    (directory / "trtexec").mkdir(exist_ok=True)
    files = {"my_notes.txt": b"tuned on the lab Orin\n", "trtexec/vision_b1.times.json": b"[{\"latencyMs\": 1.5}]"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def _add_owned_file(artifact: Path, name: str) -> None:
    """Make ``name`` part of the artifact's previous export: listed by its (re-signed) manifest, as a file of an
    older export that the next one no longer writes."""
    (artifact / name).write_bytes(b"written by the previous export")
    data = json.loads((artifact / MANIFEST_NAME).read_text())
    data["text_assets"].append(name)
    data["checksums"][name] = hashlib.sha256(b"written by the previous export").hexdigest()
    (artifact / MANIFEST_NAME).write_text(json.dumps(sign(data), indent=1))
    read_manifest(artifact, verify_checksums=True)  # still a valid artifact


def _no_scratch(*directories: Path) -> None:
    for directory in directories:
        junk = [p.name for p in directory.iterdir() if ".apet-" in p.name]
        assert junk == [], f"scratch left in {directory}: {junk}"


# -- items 1 and 2: --overwrite keeps the user's files; a symlinked artifact is updated through its link -----------
@pytest.mark.trt
def test_overwrite_through_a_symlink_keeps_user_files_and_the_link(artifact_factory, tiny_checkpoint: Path, rtx_api,
                                                                   tmp_path: Path) -> None:
    real = tmp_path / "realart"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1, dtype="fp16"), real)
    for name in ("vision.plan", "llm.plan"):  # engines of the previous export: stale once it is replaced
        (real / name).write_text(f"previous {name}")
    (real / REPORT_NAME).write_text('{"engines": {}, "manifest_sha256": "previous"}')
    _add_owned_file(real, "old_extra.txt")
    user = _user_files(real)
    current = tmp_path / "current"
    current.symlink_to("realart")

    export = _cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.22", "--stages", "1", "--dtype", "fp16",
                  "--out", str(current), "--overwrite")
    assert export.returncode == 0, export.stderr
    assert "kept 2 entries" in export.stderr and "my_notes.txt, trtexec/" in export.stderr, export.stderr
    assert current.is_symlink() and os.readlink(current) == "realart"
    manifest = read_manifest(real, verify_checksums=True)
    assert manifest.compression.ratio == 0.22
    for stale in ("old_extra.txt", "vision.plan", "llm.plan", REPORT_NAME):
        assert not (real / stale).exists(), f"{stale} of the previous export survived"
    assert {n: (real / n).read_bytes() for n in user} == user

    build = _cli("build", str(current), "--backend", "tensorrt-rtx", "--overwrite")
    assert build.returncode == 0, build.stderr
    assert current.is_symlink() and os.readlink(current) == "realart"
    report = json.loads((real / REPORT_NAME).read_text())
    assert report["manifest_sha256"] == hashlib.sha256((real / MANIFEST_NAME).read_bytes()).hexdigest()
    assert {n: (real / n).read_bytes() for n in user} == user
    expected = set(manifest.files()) | {MANIFEST_NAME, REPORT_NAME, "vision.plan", "llm.plan", "my_notes.txt",
                                        "trtexec"} | {n for n in BUILD_OUTPUTS if n.endswith(".layers.json")}
    assert {p.name for p in real.iterdir()} <= expected and "vision.plan" in {p.name for p in real.iterdir()}
    _no_scratch(tmp_path, real)
    inspect = _cli("inspect", str(current))
    assert inspect.returncode == 0 and "verified" in inspect.stdout, inspect.stderr


# -- item 7: --out on an empty directory or a regular file ----------------------------------------------------------
def test_out_on_a_regular_file_names_the_real_fix(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from apet import cli

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for extra in ([], ["--overwrite"]):
        code = cli.main(["export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--out", str(notes), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "is a regular file, not a directory" in err, err
        assert "remove the file" in err and "pass --overwrite" not in err, err
    assert notes.read_text() == "mine"


# -- item 3: the artifact directory is a mount point ----------------------------------------------------------------
@needs_fs
@pytest.mark.trt
def test_artifact_on_a_bind_mount_is_exported_built_and_replaced_in_place(tiny_checkpoint: Path, rtx_api,
                                                                          tmp_path: Path) -> None:
    """A real bind mount (as ``docker -v``), empty at first: export with no --overwrite (item 7: an empty
    directory is accepted), a user's file, a build with --overwrite; the mount point is never renamed (that
    would fail with EBUSY), stays mounted, and holds a verified artifact and the user's file."""
    script = (f'mkdir "$FS/src" "$FS/mnt" && mount --bind "$FS/src" "$FS/mnt" || exit 98\n'
              f'"$PY" -m apet.cli export --model {q(tiny_checkpoint)} --ratio 0.22 --stages 1 --dtype fp16 '
              '--out "$FS/mnt"; echo "export rc=$?"\n'
              'echo mine > "$FS/mnt/my_notes.txt"\n'
              '"$PY" -m apet.cli build "$FS/mnt" --backend tensorrt-rtx --overwrite; echo "build rc=$?"\n'
              'grep -q " $FS/mnt " /proc/self/mounts && echo "still mounted"\n'
              '"$PY" -m apet.cli inspect "$FS/mnt" | tail -1; cat "$FS/src/my_notes.txt"\n'
              'echo "entries:"; ls -A "$FS/src"')
    result = small_fs.run(tmp_path / "fs", "96m", script)
    out = result.stdout
    assert "export rc=0" in out and "build rc=0" in out, out + result.stderr
    assert "still mounted" in out and "verified" in out and "mine" in out, out + result.stderr
    entries = set(out.split("entries:")[1].split())
    assert "my_notes.txt" in entries and {MANIFEST_NAME, "vision.plan", "llm.plan", REPORT_NAME} <= entries
    assert not [e for e in entries if ".apet-" in e], entries
    assert "Device or resource busy" not in result.stderr


# -- item 3: readers during repeated replacements --------------------------------------------------------------------
class _RenameGuard:
    """Fault injection for where no bind mount can be made, kept on everywhere: renaming or exchanging the
    artifact directory itself fails with EBUSY, as it does on a mount point (``os.rename``/``os.replace`` and
    the renameat2 exchange are what apet renames with)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        from apet import atomic

        self.directory = os.path.realpath(directory)
        self.refused = 0
        for module, name in ((os, "rename"), (os, "replace"), (atomic, "_exchange")):
            monkeypatch.setattr(module, name, self._guarded(getattr(module, name)))

    def _guarded(self, real):
        def call(src, dst, *args, **kwargs):
            if self.directory in (os.path.realpath(src), os.path.realpath(dst)):
                self.refused += 1
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
            return real(src, dst, *args, **kwargs)
        return call


def _swap(artifact: Path, source: Path) -> None:
    """Replace the artifact's files with ``source``'s through the commit apet-export and apet-build use."""
    from apet.atomic import replace_files

    names = [p.name for p in source.iterdir() if p.is_file()]
    with replace_files(artifact, last=[MANIFEST_NAME, REPORT_NAME]) as stage:
        for name in names:
            shutil.copy2(source / name, stage.path / name)
        stage.files = names
        stage.remove = (set(read_manifest(artifact).files()) | set(BUILD_OUTPUTS)) - set(names)


def _reader(stop: threading.Event, outcomes: list, errors: list, read) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            try:
                outcomes.append(read())
            except ArtifactChangedError:
                outcomes.append("changed")
            except BaseException as exc:  # a mix reported as corruption, or any other failure: the test fails
                errors.append(exc)
                return
            time.sleep(0.1)  # leave the writer (and the machine) some room

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.trt
def test_readers_see_one_version_during_exports_builds_and_swaps(artifact_factory, tiny_checkpoint: Path, rtx_api,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Pipeline.load, apet inspect and read_manifest(verify_checksums=True) loop in threads while the artifact is
    re-exported, rebuilt and then swapped back and forth ~25 times (the directory itself may never be renamed).
    Each read must be all of version A, all of version B, or ArtifactChangedError; the vision graph a Pipeline
    loaded must keep as many tokens as the manifest it loaded says (an independent check of the pairing)."""
    from apet.engines.build import BuildConfig, build_artifact
    from apet.export.artifact import ExportConfig, export_artifact
    from apet.inspect_artifact import inspect
    from apet.runtime.pipeline import Pipeline

    old = artifact_factory(ratio=0.11, stages=1)
    artifact = tmp_path / "artifact"
    shutil.copytree(old, artifact)
    guard = _RenameGuard(monkeypatch, artifact)

    def load() -> tuple[float, int, int]:
        pipeline = Pipeline.load(artifact, backend="onnxruntime")
        keep = pipeline.backend.vision.get_outputs()[1].shape[1]
        return pipeline.manifest.compression.ratio, pipeline.manifest.visual_tokens, keep

    def verified() -> float:
        return read_manifest(artifact, verify_checksums=True).compression.ratio

    def inspected() -> str:
        text = inspect(artifact)
        assert "verified" in text.splitlines()[-1]
        return next(line for line in text.splitlines() if line.startswith("  ApET"))

    caplog.set_level(logging.DEBUG, logger="apet.manifest")
    stop = threading.Event()
    loads, checks, inspections, errors = [], [], [], []
    threads = [_reader(stop, loads, errors, load), _reader(stop, checks, errors, verified),
               _reader(stop, inspections, errors, inspected)]
    try:
        export_artifact(ExportConfig(model=str(tiny_checkpoint), out=artifact, ratio=0.22, stages=1, dtype="fp32",
                                     overwrite=True))
        build_artifact(BuildConfig(artifact=artifact, backend="tensorrt-rtx", overwrite=True, max_context=256),
                       api=rtx_api)
        new = tmp_path / "new"
        shutil.copytree(artifact, new)
        rng = random.Random(0)
        for i in range(24):
            _swap(artifact, old if i % 2 == 0 else new)
            time.sleep(rng.uniform(0.0, 0.6))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == [], errors
    retries = [r for r in caplog.records if "reading again" in r.getMessage()]
    assert retries, "no read overlapped a replacement: the test exercised nothing"
    assert guard.refused == 0  # nothing even tried to rename the artifact directory
    ratios = {0.11, 0.22}
    for ratio, visual, keep in [x for x in loads if x != "changed"]:
        assert ratio in ratios and keep == visual, (ratio, visual, keep)
    assert {x for x in checks if x != "changed"} <= ratios
    assert len([x for x in loads + checks + inspections if x != "changed"]) >= 6, (loads, checks, inspections)
    assert read_manifest(artifact, verify_checksums=True).compression.ratio == 0.22  # the last swap: new
    _no_scratch(tmp_path, artifact)
