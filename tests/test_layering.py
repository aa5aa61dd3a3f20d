"""Dependencies point one way: the API package (tensorfold/) -> targets -> runtime -> ir, and passes -> ir.

Every module under ir/, passes/, runtime/ and targets/ is parsed (imports inside functions
included, relative imports resolved); none may import the API package above them, and each
folder imports only the folders the design's layout table allows it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the tensorfold subpackages it may import (docs/architecture.md#layout)
ALLOWED = {
    "ir": {"ir"},
    "passes": {"ir", "passes"},
    "runtime": {"ir", "runtime"},
    "targets": {"ir", "runtime", "targets"},
}
# the API layer: tensorfold/ itself and what lives in it
API = {"tensorfold", "tensorfold.examples", "tensorfold.cli", "tensorfold.models", "tensorfold.measure",
       "tensorfold.build", "tensorfold.errors", "tensorfold.deployment"}


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Absolute names of everything `source` (module `module`) imports; `from X import y` gives X.y too."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            names.append(stem)
            names += [f"{stem}.{alias.name}" for alias in node.names]
    return names


def violations(folder: str, source: str, module: str, is_package: bool = False) -> list[str]:
    found = []
    for name in imported_modules(source, module, is_package):
        if not (name == "tensorfold" or name.startswith("tensorfold.")):
            continue
        parts = name.split(".")
        if name in API or (len(parts) > 1 and ".".join(parts[:2]) in API):
            found.append(f"{module} imports {name} (the API package above it)")
        elif len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in ALLOWED[folder]:
            found.append(f"{module} imports {name} ({folder}/ may import only {sorted(ALLOWED[folder])})")
    return found


def _modules(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = ["tensorfold", *relative.parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), is_package


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_imports_point_one_way(folder):
    modules = list(_modules(folder))
    assert modules, f"no modules found under {folder}/"
    found = [v for path, module, is_package in modules
             for v in violations(folder, path.read_text(), module, is_package)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder, source, module, is_package", [
    ("targets", "def f():\n    import tensorfold\n    return tensorfold.__version__\n", "tensorfold.targets.build", False),
    ("runtime", "from tensorfold.examples import digits\n", "tensorfold.runtime.datasets", False),
    ("runtime", "from tensorfold import cli\n", "tensorfold.runtime.x", False),
    ("ir", "from tensorfold.models import resolve\n", "tensorfold.ir.graph", False),
    ("passes", "from ...runtime.calibration import calibration_feeds\n", "tensorfold.passes.quantize.int8", False),
    ("passes", "from tensorfold.targets import get_target\n", "tensorfold.passes.x", False),
    ("ir", "from tensorfold.passes import registry\n", "tensorfold.ir.x", False),
    ("runtime", "from ... import measure\n", "tensorfold.runtime.tasks", True),
    ("runtime", "from tensorfold.targets.build import build\n", "tensorfold.runtime.x", False),
    ("targets", "from tensorfold.deployment.select import select\n", "tensorfold.targets.x", False),
])
def test_the_checker_catches_back_edges(folder, source, module, is_package):
    assert violations(folder, source, module, is_package)


def test_the_checker_allows_the_layers_below():
    assert not violations("targets", "from tensorfold.runtime import engines\nfrom ..ir.errors import X\n",
                          "tensorfold.targets.build")
    assert not violations("runtime", "from .tasks import get_task\nfrom tensorfold.ir import Graph\n",
                          "tensorfold.runtime.datasets")
