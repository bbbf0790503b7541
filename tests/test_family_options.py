"""Families declare their own CLI options and --model names; the CLI builds its flags, choices and help from the
registry (issue 27, part 1): a family added to the registry shows up without editing cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from apet.errors import UsageError
from apet.models.family import Family, FamilyOption
from apet.models.registry import FAMILIES, families, get_family


def _help(command: str = "export") -> str:
    """Every option's help and the usage line, unwrapped (argparse wraps at hyphens)."""
    from apet.cli import _parser

    parser = _parser(command)
    helps = [(action.help or "").replace("%%", "%") for action in parser._actions]
    return " ".join([parser.format_usage(), *helps])


def test_model_help_names_every_registered_family() -> None:
    text = _help()
    for family in families().values():
        names = ([family.tiny] if family.tiny else []) + list(family.aliases) + list(family.shapes)
        assert f"{family.name}: {' | '.join(names)}" in text  # Qwen2.5-VL included by construction
    bench = _help("bench")
    assert all(family.tiny in bench for family in families().values())


def test_family_flags_list_each_declaring_family() -> None:
    text = _help()
    assert "--image-fit {pad,crop}" in text and "--media {video,image}" in text
    for family in families().values():
        for option in family.export_options:
            assert option.flag in text and f"{family.name}: {option.describe()}" in text


class _FakeFamily(Family):
    """A family from another package: only its declarations matter here."""

    name = "fake-vlm"
    model_types = ("fake_vlm",)
    tiny = "tiny-fake-vlm"
    shapes = ("fake-vlm-shapes",)
    export_options = (FamilyOption("--frames", "frames per clip", kind=int, detail="default 4"),
                      FamilyOption("--fake-mode", "how fake", choices=("a", "b"), default="a"))

    def processor(self, artifact_dir, manifest):
        raise NotImplementedError

    def max_visual_tokens(self, manifest):
        return 1

    def vision_dims(self, manifest, max_batch):
        return {}


@pytest.fixture
def fake_family():
    families()  # the built-in ones first
    FAMILIES[_FakeFamily.name] = _FakeFamily()
    yield FAMILIES[_FakeFamily.name]
    del FAMILIES[_FakeFamily.name]


def test_a_registered_family_brings_its_names_and_flags(fake_family) -> None:
    from apet.cli import _family_options, _parser

    text = _help()
    assert "fake-vlm: tiny-fake-vlm | fake-vlm-shapes" in text
    assert "--fake-mode {a,b}" in text and "fake-vlm: default a" in text and "fake-vlm: default 4" in text
    args = _parser("export").parse_args(["--model", "m", "--ratio", "0.3", "--out", "o", "--frames", "3",
                                         "--fake-mode", "b"])
    assert _family_options(args) == {"frames": 3, "fake-mode": "b"}
    with pytest.raises(SystemExit):
        _parser("export").parse_args(["--model", "m", "--ratio", "0.3", "--out", "o", "--frames", "x"])
    assert fake_family.resolve_export_options({"frames": "3"}) == {"frames": 3, "fake-mode": "a"}


def test_options_are_checked_by_the_family_before_the_model_loads(monkeypatch, tmp_path: Path) -> None:
    import apet.models.registry as registry
    from apet.export.artifact import ExportConfig, export_artifact

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(registry, "load_adapter", no_loading)
    for model, options, words in [("tiny", {"max-views": 3}, "--max-views is not available for the llava family"),
                                  ("tiny", {"frames": 8}, "--frames is not available for the llava family"),
                                  ("tiny-llava-next", {"image-fit": "pad"}, "--image-fit is not available"),
                                  ("tiny-llava-next", {"max-views": "many"}, "--max-views 'many' is not a valid int"),
                                  ("tiny", {"image-fit": "stretch"}, "--image-fit 'stretch' is not available")]:
        with pytest.raises(UsageError) as info:
            export_artifact(ExportConfig(model=model, out=tmp_path / "x", ratio=0.3, family_options=options))
        assert words in str(info.value)


def test_apply_runs_the_adapter_setters_in_declared_order() -> None:
    """--media applies before --frames and --prompt-template whatever order the user wrote them in."""
    calls = []

    class Adapter:
        family = "video-llava"

        def customize(self, **options):
            calls.extend(options)

    get_family("video-llava").apply_export_options(Adapter(), {"prompt-template": "hf", "frames": 4,
                                                               "media": "image"})
    assert calls == ["media", "frames", "prompt_template"]


def test_customize_refuses_an_option_the_adapter_has_no_setter_for(tiny_adapter) -> None:
    with pytest.raises(UsageError, match="--max-views is not available for llava"):
        tiny_adapter.customize(max_views=3)
    tiny_adapter.customize(prompt_template=None, image_fit=None)  # None keeps the defaults
