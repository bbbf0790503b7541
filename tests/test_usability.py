"""What a new user meets first (issue 26 item 7): help text, fast refusals of bad arguments, messages in the
words of the interface used (flags on the command line, parameter names in Python), consistent reporting."""

from __future__ import annotations

import re

import pytest

from apet.cli import COMMANDS, _parser


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_are_printed_once(command: str) -> None:
    text = " ".join(_parser(command).format_help().split())
    # every option's help: a default named in words is not followed by argparse's "(default: X)"
    parser = _parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        rendered = formatter._get_help_string(action) or ""
        if "%(default)" in rendered:
            assert not re.search(r"\bdefault\b", rendered.replace("(default: %(default)s)", ""), re.IGNORECASE), \
                rendered
    if command == "export":
        assert "basis size k (default 10)" in text and "(default 10) (default: 10)" not in text
        assert "(default: None)" not in text and "(default: False)" not in text


def test_fp32_artifact_says_its_weights_are_fp32(artifact_factory) -> None:
    from apet.inspect_artifact import describe
    from apet.manifest import read_manifest

    artifact = artifact_factory(ratio=0.11, stages=1)  # dtype fp32
    assert read_manifest(artifact).dtype == "fp32"
    assert "  weights    LLM fp32 (not quantized)" in describe(artifact).splitlines()


def test_stale_engines_ask_for_a_rebuild_not_a_re_export(artifact_factory, tmp_path) -> None:
    import json
    import shutil

    from apet.contracts.files import REPORT_NAME
    from apet.errors import ArtifactError
    from apet.inspect_artifact import verify

    artifact = tmp_path / "art"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1), artifact)
    (artifact / "vision.plan").write_bytes(b"engine of an earlier export")
    (artifact / REPORT_NAME).write_text(json.dumps({"manifest_sha256": "0" * 64, "engines": {
        "vision": {"file": "vision.plan", "sha256": "0" * 64}}}))
    with pytest.raises(ArtifactError) as stale:
        verify(artifact)
    assert "engines are stale" in stale.value.what and "re-export" not in str(stale.value)
    assert stale.value.fix == f"rebuild the engines: apet-build {artifact} --overwrite (the export itself is intact)"

    with (artifact / "vision.onnx").open("ab") as f:  # now the export itself is damaged too
        f.write(b"\0")
    with pytest.raises(ArtifactError) as damaged:
        verify(artifact)
    assert "vision.onnx" in damaged.value.what and damaged.value.fix.startswith("re-export the artifact")
    assert f"apet-build {artifact} --overwrite" in damaged.value.fix


FAST = ("import json, sys, time; from apet.cli import main; t0 = time.perf_counter(); rc = main(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 's': time.perf_counter() - t0}))")


@pytest.mark.parametrize(("args", "code", "words"), [
    (["export", "--model", "tiny", "--ratio", "0", "--out", "OUT"], 2, "--ratio 0 is outside the allowed range (0, 1]"),
    (["export", "--model", "tiny", "--tokens", "0", "--out", "OUT"], 2, "K1=0 is below 11 (the 10 basis tokens"),
    (["export", "--model", "tiny", "--tokens", "96,0", "--out", "OUT"], 2, "K2=0 is below 11"),
    (["run", "OUT", "--image", "MISSING.png", "--prompt", "hi"], 3, "MISSING.png does not exist"),
    (["run", "OUT", "--image", "DATA", "--prompt", "hi"], 3, "data.jsonl"),  # not an image
    (["bench", "--model", "tiny", "--ratios", "1.0,0", "--out", "OUT"], 2, "--ratios: 0 is outside"),
    (["eval", "tiny", "--data", "MISSING.jsonl", "--images", "DIR", "--out", "OUT"], 3, "MISSING.jsonl does not exist"),
    (["eval", "tiny", "--data", "DATA", "--images", "MISSING", "--out", "OUT"], 2, "--images"),
    (["eval", "tiny", "--data", "DATA", "--images", "DIR", "--ratios", "1,0", "--out", "OUT"], 2, "--ratios: 0"),
])
def test_bad_arguments_fail_before_torch_and_the_model(args: list[str], code: int, words: str, tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "data.jsonl").write_text('{"id": 1, "image": "a.png", "question": "q?", "answers": ["a"]}\n')
    names = {"OUT": tmp_path / "out", "MISSING.png": tmp_path / "MISSING.png", "DATA": tmp_path / "data.jsonl",
             "MISSING.jsonl": tmp_path / "MISSING.jsonl", "DIR": tmp_path, "MISSING": tmp_path / "nope"}
    argv = [str(names.get(a, a)) for a in args]
    done = subprocess.run([sys.executable, "-c", FAST, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "APET_CACHE": str(tmp_path / "cache")})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == code and done.stderr.startswith("error: ") and words in done.stderr, done.stderr
    assert not result["torch"], "torch was imported before the argument was refused"
    assert result["s"] < 2.0, result  # no model, no torch: answered at once
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_python_errors_name_parameters_and_cli_errors_name_flags(artifact_factory, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from apet import Pipeline
    from apet.errors import InputError, UsageError
    from apet.runtime.sampling import GenerationConfig

    artifact = artifact_factory(ratio=0.11, stages=1)
    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    with pytest.raises(InputError) as empty:
        pipeline.generate("@demo", "")
    assert empty.value.fix == "pass a question or instruction, e.g. prompt='What is this?'"
    with pytest.raises(UsageError) as zero:
        GenerationConfig(max_new_tokens=0)
    assert zero.value.fix == "pass max_new_tokens=1 or more" and "--" not in str(zero.value)

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "apet.cli", "run", str(artifact), "--image", "@demo",
                               "--backend", "onnxruntime", *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ}).stderr
    assert cli("--prompt", "").strip().endswith("e.g. --prompt 'What is this?'")
    assert cli("--prompt", "hi", "--max-new-tokens", "0").strip().endswith("pass --max-new-tokens 1 or more")


def test_a_budget_below_the_basis_names_the_least_ratio() -> None:
    from apet.contracts.plan import plan_compression
    from apet.errors import UsageError

    with pytest.raises(UsageError) as low:  # 64 tokens per view (the tiny LLaVA-NeXT before issue 26)
        plan_compression(64, 4, ratio=0.11, stages=2)
    assert "K1=8 tokens is outside [11, 64]" in low.value.what and "--ratio 0.38 or more" in low.value.fix
    # the named ratio is the boundary: K2 = round8(0.5 * 0.38 * 64) = 16 > 10 works, 0.37 gives K2 = 8
    assert plan_compression(64, 4, ratio=0.38, stages=2).stage2.keep == 16
    with pytest.raises(UsageError):
        plan_compression(64, 4, ratio=0.37, stages=2)
    with pytest.raises(UsageError) as one:
        plan_compression(64, 4, ratio=0.11, stages=1)
    assert "--ratio 0.19 or more" in one.value.fix  # round8(0.19 * 64) = 16; round8(0.18 * 64) = 8
