"""``apet-build ART --out DIR`` (apet/engines/build_dir.py): engines for an artifact on a read-only volume or in a
shared store. DIR links the export's files (hard links on one filesystem, symbolic links across), holds the
engines, verifies and answers as the source does; the source is never written; a directory holding anything else
is refused and left as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import small_fs
from small_fs import q

from apet.contracts.files import MANIFEST_NAME, REPORT_NAME, manifest_digest
from apet.manifest import read_manifest

NO_REAL_FS = small_fs.available()
needs_fs = pytest.mark.skipif(NO_REAL_FS is not None, reason=f"private mounts unavailable: {NO_REAL_FS}")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apet.cli", *args], capture_output=True, text=True, timeout=300)


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.trt
def test_out_on_one_filesystem_hard_links_the_export_and_builds_beside_it(artifact_factory, rtx_api,
                                                                          tmp_path: Path) -> None:
    source = tmp_path / "store" / "llava"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1, dtype="fp16"), source)
    before = _listing(source)
    out = tmp_path / "engines" / "llava-orin"

    build = _cli("build", str(source), "--backend", "tensorrt-rtx", "--out", str(out))
    assert build.returncode == 0, build.stderr
    assert f"{out}: the export of {source}" in build.stdout
    assert _listing(source) == before  # nothing written into the source, not even scratch
    manifest = read_manifest(out, verify_checksums=True)
    for name in [MANIFEST_NAME, *manifest.files()]:  # hard links: the same inodes, no copy
        assert not (out / name).is_symlink() and (out / name).stat().st_ino == (source / name).stat().st_ino, name
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["manifest_sha256"] == manifest_digest(source) and set(report["engines"]) == {"vision", "llm"}
    inspect = _cli("inspect", str(out))
    assert inspect.returncode == 0 and "vision.plan, llm.plan against build_report.json" in inspect.stdout

    # a second --out into the same directory rebuilds there (one graph: the other engine is kept)
    again = _cli("build", str(source), "--backend", "tensorrt-rtx", "--out", str(out), "--graphs", "vision")
    assert again.returncode == 0, again.stderr
    assert set(json.loads((out / REPORT_NAME).read_text())["engines"]) == {"vision", "llm"}
    assert _listing(source) == before

    # a directory holding anything else is refused and left as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused = _cli("build", str(source), "--backend", "tensorrt-rtx", "--out", str(mine))
    assert refused.returncode == 2 and "does not hold this export" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@needs_fs
@pytest.mark.trt
def test_read_only_volume_builds_into_out_with_symbolic_links(artifact_factory, rtx_api, tmp_path: Path) -> None:
    """A real read-only mount (as a model store mounted ``:ro``): building in place is refused before any work
    (exit 6, a storage error), naming --out; --out on another filesystem links by symbolic links, builds,
    verifies, and answers with the source's tokens; --emit-trtexec takes --out too."""
    artifact = artifact_factory(ratio=0.11, stages=1, dtype="fp16")
    out = tmp_path / "out"
    run = ("-m apet.cli run {} --backend onnxruntime --image @demo --prompt 'What is this?' --max-new-tokens 6 "
           "--json")
    source_run, out_run = run.format('"$FS"'), run.format(q(out))
    script = (f'cp -r {q(artifact)}/. "$FS"/ && readonly || exit 98\n'
              '"$PY" -m apet.cli build "$FS" --backend tensorrt-rtx; echo "inplace rc=$?"\n'
              f'"$PY" -m apet.cli build "$FS" --backend tensorrt-rtx --out {q(out)}; echo "out rc=$?"\n'
              f'"$PY" -m apet.cli inspect {q(out)} | tail -1\n'
              f'echo "links:"; find {q(out)} -maxdepth 1 -type l | wc -l\n'
              f'echo "@@source"; "$PY" {source_run}\n'
              f'echo "@@out"; "$PY" {out_run}\n'
              f'"$PY" -m apet.cli build "$FS" --emit-trtexec --out {q(out)}; echo "trtexec rc=$?"\n'
              'echo "entries:"; ls -A "$FS"')
    result = small_fs.run(tmp_path / "fs", "64m", script)
    stdout, stderr = result.stdout, result.stderr
    assert "inplace rc=6" in stdout and "out rc=0" in stdout, stdout + stderr
    assert "is on a read-only file system" in stderr and "--out DIR" in stderr, stderr
    assert "verified" in stdout and "against build_report.json" in stdout, stdout + stderr
    export_files = len(read_manifest(artifact).files()) + 1
    assert int(stdout.split("links:")[1].split()[0]) == export_files  # every export file, and only those
    source_answer = json.loads(stdout.split("@@source\n")[1].split("\n")[0])
    out_answer = json.loads(stdout.split("@@out\n")[1].split("\n")[0])
    assert out_answer["token_ids"] == source_answer["token_ids"] and len(source_answer["token_ids"]) == 6
    assert out_answer["keep_index"] == source_answer["keep_index"]
    assert "trtexec rc=0" in stdout and (out / "trtexec.sh").is_file()
    entries = set(stdout.split("entries:")[1].split())
    assert entries == set(os.listdir(artifact)), entries  # the read-only source gained nothing
