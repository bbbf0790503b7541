"""The layer contract (.importlinter, docs/architecture.md) holds, a deliberate upward import breaks it, and the
module graph has no cycles (function-level imports included; ``if TYPE_CHECKING:`` ones are annotations)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the ``apet`` package found in ``package_root`` (grimp reads it from sys.path)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / ".importlinter"), "--no-cache"],
                          capture_output=True, text=True, timeout=300, cwd=package_root,
                          env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"})


def test_layer_contract_holds() -> None:
    pytest.importorskip("importlinter", reason="pip install 'apet[dev]'")
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("contracts/io.py", "import apet.runtime.pipeline  # noqa\n", "apet's layers"),  # upward
    ("runtime/sampling.py", "import torch  # noqa\n", "never imports torch"),  # torch on the device side
])
def test_a_deliberate_violation_breaks_the_contract(tmp_path, module, line, broken) -> None:
    pytest.importorskip("importlinter", reason="pip install 'apet[dev]'")
    shutil.copytree(ROOT / "apet", tmp_path / "apet", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    target = tmp_path / "apet" / module
    target.write_text(target.read_text() + "\n" + line)
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert broken in done.stdout and "BROKEN" in done.stdout, done.stdout[-2000:]


def test_no_import_cycles() -> None:
    grimp = pytest.importorskip("grimp", reason="pip install 'apet[dev]' (import-linter brings grimp)")
    graph = grimp.build_graph("apet", exclude_type_checking_imports=True)
    modules = sorted(m for m in graph.modules if m.startswith("apet"))
    edges = {m: [t for t in graph.find_modules_directly_imported_by(m) if t.startswith("apet")] for m in modules}
    # Tarjan's strongly connected components, iteratively: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert cycles == [], f"import cycles: {cycles}"
