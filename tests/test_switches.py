"""The GPU path's environment switches (apet/switches.py): values parsed strictly, read only there, documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apet import switches
from apet.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", [None, "", "1", "true", "On", " YES "])
def test_unset_or_an_on_value_keeps_a_switch_on(value):
    assert switches.parse("APET_GEMV", value) is True


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no", " 0 "])
def test_an_off_value_turns_a_switch_off(value):
    assert switches.parse("APET_GEMV", value) is False


@pytest.mark.parametrize("value", ["2", "maybe", "disable", "-1"])
def test_any_other_value_is_refused_with_what_the_variable_does(value):
    with pytest.raises(UsageError) as caught:
        switches.parse("APET_CACHE_WRITE", value)
    message = str(caught.value)
    assert f"APET_CACHE_WRITE={value!r}" in message
    assert "to 1 (the default: " in message and "or 0 (torch's strided assignment)" in message
    assert caught.value.exit_code == 2


def test_enabled_reads_the_environment(monkeypatch):
    monkeypatch.setenv("APET_PDL", "off")
    assert switches.enabled("APET_PDL") is False
    monkeypatch.delenv("APET_PDL")
    assert switches.enabled("APET_PDL") is True


def _reads(variable: str) -> list[str]:
    """Modules of the package whose source names ``variable``."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "apet").rglob("*.py")
                  if re.search(rf"['\"]{variable}['\"]", path.read_text()))


@pytest.mark.parametrize("variable", sorted(switches.SWITCHES))
def test_each_switch_is_read_by_its_home_through_the_registry_only(variable):
    home = switches.SWITCHES[variable].home
    source = (ROOT / (home.replace(".", "/") + ".py")).read_text()
    assert f'switches.enabled("{variable}")' in source
    assert _reads(variable) == sorted(["apet/switches.py", home.replace(".", "/") + ".py"])


def test_no_module_reads_a_switch_like_variable_of_its_own():
    """The old pattern (``os.environ.get("APET_X", "1") != "0"``) took ``false`` for on: every boolean APET_
    variable goes through the registry."""
    pattern = re.compile(r"os\.environ\.get\(\s*['\"](APET_\w+)['\"]\s*,\s*['\"][01]['\"]")
    found = {match for path in (ROOT / "apet").rglob("*.py") for match in pattern.findall(path.read_text())}
    assert found == set()


def test_the_architecture_doc_lists_every_switch_as_the_registry_has_it():
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^  \| `(APET_\w+)` \| (.+?) \| (.+?) \| `([\w.]+)` \|$", text, flags=re.M)
    assert [(v, on, off, home) for v, on, off, home in rows] == \
        [(s.variable, s.on, s.off, s.home) for s in switches.SWITCHES.values()]


def test_a_module_takes_its_switch_from_the_environment_at_import():
    """In a fresh process: ``off`` turns the kernel off (it stayed on before), a typo stops the import with the
    UsageError."""
    code = "from apet.kernels import cache_write; print(cache_write.ENABLED['value'])"
    env = {key: value for key, value in os.environ.items() if key != "APET_CACHE_WRITE"}
    off = subprocess.run([sys.executable, "-c", code], env={**env, "APET_CACHE_WRITE": "off"},
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert off.stdout.strip() == "False"
    typo = subprocess.run([sys.executable, "-c", code], env={**env, "APET_CACHE_WRITE": "of"},
                          capture_output=True, text=True, cwd=ROOT)
    assert typo.returncode != 0
    assert "UsageError: APET_CACHE_WRITE='of' is neither on nor off" in typo.stderr
