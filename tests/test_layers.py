"""The package's layers import in one direction only (docs/architecture.md draws them).

Parses every module of ``explora`` (module-level *and* function-level imports, so a deferred import cannot hide an
upward dependency) and fails on an import of a higher layer, naming the importing file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import explora

PACKAGE = Path(explora.__file__).resolve().parent

# Lowest first. A module may import its own layer and any lower one.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("vit", "presets"),
    ("models", "data"),
    ("objectives", "engine", "eval", "analysis"),
    ("recipes",),
    ("cli",),
]
TOP_LEVEL = {"__init__", "__main__"}  # the public API and `python -m explora` see everything


def layer_of(module: str) -> int | None:
    """Layer index of ``explora.<sub>...``; None for the top-level entry points."""
    parts = module.split(".")
    if parts[0] != "explora" or len(parts) < 2 or parts[1] in TOP_LEVEL:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"explora.{parts[1]} is in no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from explora.models import backbone` imports the module explora.models.backbone, not just the package
            submodules = [f"{target}.{alias.name}" for alias in node.names
                          if target.startswith("explora") and _is_module(f"{target}.{alias.name}")]
            out += [(node.lineno, name) for name in submodules] if submodules else [(node.lineno, target)]
    return [(line, name) for line, name in out if name == "explora" or name.startswith("explora.")]


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {name for names in LAYERS for name in names}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    module = module_name(path)
    own = layer_of(module)
    if own is None:
        return
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} (layer {LAYERS[layer_of(name)]})"
              for line, name in imported_modules(path, module)
              if name != "explora" and layer_of(name) is not None and layer_of(name) > own]
    assert not upward, f"{module} is in layer {LAYERS[own]}; upward imports:\n" + "\n".join(upward)
    assert all(name != "explora" for _, name in imported_modules(path, module)), \
        f"{module} imports the top-level package (the public API); import the defining module instead"


def test_architecture_doc_lists_every_module():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in MODULES
               if p.parent != PACKAGE and (p.name != "__init__.py" or p.parent.name == "presets")
               and f"`{p.relative_to(PACKAGE.parent)}`" not in doc]
    assert not missing, "docs/architecture.md does not list: " + ", ".join(missing)
