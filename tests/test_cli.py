"""The command line as a user meets it: help and version, refused option combinations, messages that
name the option at fault, quiet first runs, and the Python entry point."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from apet import __version__
from apet.cli import COMMANDS, _parser


def _cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apet.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _clean_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_and_defaults_are_shown(command: str) -> None:
    parser = _parser(command)
    undocumented = [a.option_strings or a.dest for a in parser._actions
                    if not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and not a.help]
    assert undocumented == []
    text = parser.format_help()
    assert "``" not in text and "::" not in text
    formatter = parser._get_formatter()  # a real default is shown, in the help's words or as "(default: X)"
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown = formatter._get_help_string(action) or ""
            assert "%(default)s" in shown or "default" in shown.lower(), action.option_strings


def test_version_and_eval_help() -> None:
    for args in (["--version"], ["export", "--version"]):
        result = _cli(*args)
        assert result.returncode == 0 and __version__ in result.stdout
    eval_help = _cli("eval", "--help").stdout
    assert '"answers"' in eval_help and "pope" in eval_help and "``" not in eval_help


@pytest.mark.parametrize(("args", "code", "words"), [
    (["export", "--model", "tiny", "--tokens", "32,96", "--out", "x"], 2, "K2=96"),
    (["export", "--model", "tiny", "--tokens", "64,64", "--out", "x"], 2, "K2=64"),
    (["export", "--model", "tiny", "--ratio", "0.5", "--tokens", "64", "--out", "x"], 2, "both set the budget"),
    (["export", "--model", "tiny", "--ratio", "0.11", "--device", "tpu", "--out", "x"], 2, "--device 'tpu'"),
    (["bench", "--model", "tiny", "--batch", "0", "--out", "x"], 2, "--batch 0"),
    (["bench", "--model", "tiny", "--device", "tpu", "--out", "x"], 2, "--device 'tpu'"),
])
def test_contradictory_or_unsupported_options_are_refused(args: list[str], code: int, words: str,
                                                           tmp_path: Path) -> None:
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    _clean_error(_cli(*args), code, words)
    assert not (tmp_path / "x").exists()


def test_cuda_without_a_visible_gpu_is_a_clean_error(tmp_path: Path) -> None:
    """--device cuda where torch sees no GPU: a CPU-only build here, a hidden GPU on CUDA machines."""
    import torch

    why = "CPU-only" if torch.version.cuda is None else "sees no CUDA device"
    _clean_error(_cli("export", "--model", "tiny", "--ratio", "0.11", "--device", "cuda", "--out",
                      str(tmp_path / "x"), env={"CUDA_VISIBLE_DEVICES": ""}), 5, "--device cuda", why)
    assert not (tmp_path / "x").exists()


def test_run_messages_name_the_option(artifact_factory, tmp_path: Path) -> None:
    artifact = artifact_factory(ratio=0.11, stages=1)
    _clean_error(_cli("run", str(artifact), "--image", str(tmp_path), "--prompt", "hi"), 3, "is a directory")
    _clean_error(_cli("run", str(artifact), "--image", "@demo", "--prompt", "hi", "--backend", "torch",
                      "--checkpoint", "/nonexistent"), 2, "--checkpoint '/nonexistent'")
    _clean_error(_cli("run", str(artifact), "--image", "@demo", "--prompt", "hi", "--device", "tpu"), 2, "tpu")


def test_first_run_is_quiet(tmp_path: Path) -> None:
    """A fresh cache: creating the tiny checkpoint and exporting print apet's own lines only."""
    result = _cli("export", "--model", "tiny", "--ratio", "0.11", "--out", str(tmp_path / "demo"),
                  env={"APET_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    for noise in ("torchvision", "Loading weights", "Writing model shards", "past_key_values", "Warning"):
        assert noise not in result.stderr, result.stderr
    assert result.stdout.startswith("wrote ")


def test_reference_uses_the_installed_transformers_cache_argument(tiny_adapter) -> None:
    import torch

    from apet.contracts.compression import CompressionConfig
    from apet.modeling.reference import Reference

    reference = Reference(tiny_adapter, CompressionConfig(keep=32))
    embeds = torch.randn(1, 40, tiny_adapter.spec.decoder.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # "past_key_values is deprecated ... removed in 5.40"
        reference.prefill(embeds, torch.ones(1, 40, dtype=torch.long), torch.tensor([3]))


def test_pipeline_is_importable_from_apet_and_takes_the_demo_image(artifact_factory) -> None:
    from apet import Pipeline

    pipeline = Pipeline.load(artifact_factory(ratio=0.11, stages=1), backend="onnxruntime")
    result = pipeline.generate("@demo", "What is this?", max_new_tokens=2)
    assert len(result.token_ids) <= 2 and result.stats.visual_tokens == [32]


def test_stats_report_apet_milliseconds_on_onnxruntime(artifact_factory) -> None:
    result = _cli("run", str(artifact_factory(ratio=0.11, stages=2)), "--image", "@demo", "--prompt", "What?",
                  "--max-new-tokens", "2", "--backend", "onnxruntime", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert isinstance(stats["apet_ms"], float) and 0 < stats["apet_ms"] < stats["vision_ms"]


def test_stats_name_apet_where_vision_runs_inside_the_first_token(artifact_factory) -> None:
    """The static form runs vision inside ONNX Runtime's first-token graph (vision ms 0): the stats line says
    "vision + prefill" and still gives ApET's ms, profiled apart."""
    import re

    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    result = _cli("run", str(artifact), "--image", "@demo", "--prompt", "What?", "--max-new-tokens", "2",
                  "--backend", "onnxruntime", "--stats")
    assert result.returncode == 0, result.stderr
    assert re.search(r"vision \+ prefill [0-9.]+ ms \(ApET [0-9.]+ ms\) \| TTFT", result.stderr), result.stderr


def test_readme_points_at_what_exists() -> None:
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    for path in ("scripts/demo.sh", ".ci/run", "docs/architecture.md", "docs/errors.md", "scripts/setup.sh"):
        assert path in readme and (repo / path).is_file(), path
    assert "cat.jpg" not in readme and "DESIGN.md" not in readme
    assert "ruff check apet tests scripts" in readme and "ruff" in (repo / "pyproject.toml").read_text()
    ci = (repo / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in ci and "ruff check apet tests scripts" in ci and "pytest -q" in ci
