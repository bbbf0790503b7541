"""Nothing a user does loses their data, and the file system's refusals are clean errors (exit 6):
--overwrite only replaces apet artifacts; read-only and full file systems during export, build, trtexec
emission and eval; paths through files or into /proc."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import small_fs
from conftest import make_image
from small_fs import q

from apet.errors import StorageError

NO_REAL_FS = small_fs.available()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apet.cli", *args], capture_output=True, text=True, timeout=timeout)


def _clean_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# -- --overwrite ----------------------------------------------------------------------------------------
def test_overwrite_never_replaces_a_folder_that_is_not_an_artifact(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    result = _cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--out", str(folder), "--overwrite")
    _clean_error(result, 2, "not an apet artifact", "manifest.json")
    assert (folder / "holiday.jpg").read_bytes() == b"precious" and len(list(folder.iterdir())) == 1
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    _clean_error(_cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--out", str(notes),
                      "--overwrite"), 2, "is a regular file", "remove the file")
    assert notes.read_text() == "mine"


def test_overwrite_replaces_an_earlier_artifact(artifact_factory, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1), out)
    result = _cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.22", "--stages", "1", "--dtype", "fp32",
                  "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["compression"]["ratio"] == 0.22


# -- paths the OS refuses ---------------------------------------------------------------------------------
def test_out_through_a_file_or_into_proc_is_a_clean_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    _clean_error(_cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--out",
                      str(tmp_path / "file" / "artifact")), 6, "regular file")
    _clean_error(_cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--out",
                      "/proc/apet-artifact"), 6, "/proc")


# -- read-only and full file systems -----------------------------------------------------------------------
needs_fs = pytest.mark.skipif(NO_REAL_FS is not None, reason=f"real small file systems unavailable: {NO_REAL_FS}")


@needs_fs
def test_export_onto_read_only_or_full_file_system(tiny_checkpoint: Path, tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    export = f'"$PY" -m apet.cli export --model {q(tiny_checkpoint)} --ratio 0.11 --dtype fp32 --out "$FS/out/a"'
    ro = small_fs.run(mount, "4m", f'mkdir "$FS/out"; readonly; {export}; echo "rc=$?"; ls -A "$FS/out"')
    assert "rc=6" in ro.stdout and "read-only file system" in ro.stderr and "Traceback" not in ro.stderr, ro.stderr
    full = small_fs.run(mount, "700k", f'mkdir "$FS/out"; {export}; echo "rc=$?"; ls -A "$FS/out"')
    assert "rc=6" in full.stdout and "ran out of space" in full.stderr and "Traceback" not in full.stderr, \
        full.stdout + full.stderr
    assert full.stdout.strip().endswith("rc=6")  # nothing left in --out's parent: no partial artifact, no scratch


@needs_fs
def test_build_onto_full_file_system_keeps_previous_engines(artifact_factory, rtx_api, tmp_path: Path) -> None:
    """Room for the new vision.plan but not llm.plan: the build fails cleanly and the old engines stay."""
    source = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16"), source)
    for name in ("vision.plan", "llm.plan"):
        (source / name).write_text(f"previous {name}")
    (source / "build_report.json").write_text('{"engines": {}, "manifest_sha256": "previous"}')
    script = (f'cp -r {q(source)} "$FS/a" && "$PY" -m apet.cli build "$FS/a" --backend tensorrt-rtx --overwrite; '
              'echo "rc=$?"; cat "$FS/a/vision.plan" "$FS/a/llm.plan" "$FS/a/build_report.json"; echo; ls -A "$FS"; '
              'ls -A "$FS/a" | grep -c apet-')
    result = small_fs.run(tmp_path / "mnt", "20m", script)
    assert "rc=6" in result.stdout and "ran out of space" in result.stderr, result.stdout + result.stderr
    assert 'previous vision.planprevious llm.plan{"engines": {}, "manifest_sha256": "previous"}' in result.stdout
    assert result.stdout.strip().splitlines()[-2:] == ["a", "0"]  # no scratch left beside or inside the artifact


@needs_fs
def test_read_only_build_and_full_emission_keep_files(artifact_factory, tmp_path: Path) -> None:
    source = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1, dtype="fp16"), source)
    (source / "trtexec.sh").write_text("previous script\n")
    build = small_fs.run(tmp_path / "mnt", "8m", f'cp -r {q(source)} "$FS/a" && readonly && "$PY" -m apet.cli build '
                         '"$FS/a" --backend tensorrt-rtx; echo "rc=$?"')
    assert "rc=6" in build.stdout and "read-only file system" in build.stderr, build.stdout + build.stderr
    emit = small_fs.run(tmp_path / "mnt", "8m", f'cp -r {q(source)} "$FS/a" && fill && "$PY" -m apet.cli build '
                        '"$FS/a" --emit-trtexec; echo "rc=$?"; cat "$FS/a/trtexec.sh"')
    assert "rc=6" in emit.stdout and "ran out of space" in emit.stderr, emit.stdout + emit.stderr
    assert emit.stdout.strip().endswith("previous script")  # the old script is intact, not truncated


@needs_fs
def test_eval_onto_full_file_system_keeps_earlier_answers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Resuming on a full disk: the answers already on disk survive (the resume rewrite is atomic)."""
    images = tmp_path / "images"
    images.mkdir()
    make_image(0).save(images / "0.png")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "image": "0.png", "question": "What?", "answer": "x"}) + "\n"
                            for i in range(2)))
    earlier = tmp_path / "predictions.jsonl"
    answered = {"method": "apet", "ratio": 1.0, "benchmark": "data", "id": "q0", "type": "open", "prediction": "x",
                "score": 1.0}
    earlier.write_text(json.dumps(answered) + "\n" + '{"method": "apet", "ratio": 1.0, "bench')  # killed mid-line
    script = (f'mkdir "$FS/out" && cp {q(earlier)} "$FS/out/" && fill && "$PY" -m apet.cli eval '
              f'{q(tiny_checkpoint)} --data {q(data)} --images {q(images)} --ratios 1.0 --max-new-tokens 1 '
              '--out "$FS/out"; echo "rc=$?"; cat "$FS/out/predictions.jsonl"')
    result = small_fs.run(tmp_path / "mnt", "1m", script)
    assert "rc=6" in result.stdout and "ran out of space" in result.stderr and "Traceback" not in result.stderr, \
        result.stdout + result.stderr
    assert json.dumps(answered) in result.stdout  # the answer already on disk survived


def test_file_system_refusals_by_fault_injection(artifact_factory, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Runs everywhere, and is the only file-system test where no private tmpfs can be mounted (no
    CAP_SYS_ADMIN, no user namespaces): the OS error is injected where apet first writes (the scratch directory /
    the atomic file write), which exercises the same CLI boundary and the same leave-everything-as-it-was
    guarantees, not the kernel's behaviour."""
    import errno

    from apet import atomic, cli

    source = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1, dtype="fp16"), source)
    (source / "trtexec.sh").write_text("previous script\n")

    def refuse(code: int):
        def fail(*args, **kwargs):
            raise OSError(code, __import__("os").strerror(code), str(source))
        return fail

    with monkeypatch.context() as patch:
        patch.setattr(atomic, "_scratch", refuse(errno.EROFS))
        assert cli.main(["build", str(source), "--backend", "tensorrt-rtx"]) == 6
    assert "read-only file system" in capsys.readouterr().err
    assert not (source / "vision.plan").exists()
    with monkeypatch.context() as patch:
        patch.setattr(atomic.tempfile, "mkstemp", refuse(errno.ENOSPC))
        assert cli.main(["build", str(source), "--emit-trtexec"]) == 6
    assert "ran out of space" in capsys.readouterr().err
    assert (source / "trtexec.sh").read_text() == "previous script\n"


def test_storage_error_names_path_and_fix() -> None:
    import errno

    from apet.errors import storage_error

    error = storage_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/vision.onnx"))
    assert isinstance(error, StorageError) and error.exit_code == 6
    assert "/data/out/vision.onnx ran out of space" in str(error) and "free some space" in str(error)
