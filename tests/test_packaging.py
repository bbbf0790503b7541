"""`pip install -e .` is quiet (issue 26 item 10): the setuptools backend builds the editable wheel from this
pyproject.toml without a deprecation (the PEP 639 license string) or the import-hook finder's warning."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_build_prints_no_warning(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "apet", source / "apet", ignore=shutil.ignore_patterns("__pycache__"))
    build = ("import sys; from setuptools import build_meta; "
             "print('WHEEL', build_meta.build_editable(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-W", "always", "-c", build, str(tmp_path / "dist")], cwd=source,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Python warnings ("...Warning: ..." / setuptools' "InformationOnly: ...") are what pip shows under --quiet
    assert not re.search(r"\w*(Warning|InformationOnly): ", output), output
    wheel = tmp_path / "dist" / output.split("WHEEL ", 1)[1].split()[0]
    with zipfile.ZipFile(wheel) as zf:
        pth = [n for n in zf.namelist() if n.endswith(".pth")]
        assert len(pth) == 1 and zf.read(pth[0]).decode().strip() == str(source.resolve())
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_build_floor_supports_the_license_expression() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["project"]["license"] == "Apache-2.0"
    floor = next(r for r in config["build-system"]["requires"] if r.startswith("setuptools"))
    assert floor == "setuptools>=77"  # PEP 639 (license expressions) landed in setuptools 77.0
