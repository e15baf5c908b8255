"""ARCHITECTURE's layering, checked on the source: who may import whom among our packages.

Every ``.py`` file of a package is parsed with `ast` (nothing is imported or run) and every
import is collected: ``import x``, ``from x import y``, relative imports resolved against
the file's package, imports inside functions and classes, and ``importlib.import_module`` /
``__import__`` calls with a literal name. The rules:

- ``protocol`` imports none of our other packages;
- ``httpmetrics`` (the shared /metrics responder) imports none of our other packages;
- ``portolan`` imports neither ``varpd`` nor ``lab``; ``varpd`` imports neither ``portolan``
  nor ``lab`` (lab imports both, so importing lab would break the rule by the back door);
- ``cni`` (when it exists) imports neither ``portolan`` nor ``varpd``;
- ``lab`` is where both meet: it must import both (else it would not be needed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("protocol", "httpmetrics", "portolan", "varpd", "lab", "cni", "bench", "tests")

#: package -> our packages it must never import
FORBIDDEN = {
    "protocol": {p for p in OURS if p != "protocol"},
    "httpmetrics": {p for p in OURS if p != "httpmetrics"},
    "portolan": {"varpd", "lab", "cni", "bench", "tests"},
    "varpd": {"portolan", "lab", "cni", "bench", "tests"},
    "cni": {"portolan", "varpd", "lab", "bench", "tests"},
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # ``from . import x`` / ``from pkg import submodule``
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            first = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append((node.lineno, first.value))
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    """``file:line imports name`` for every forbidden import in ``package``."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        for line, name in imports_of(path, root):
            top = name.split(".", 1)[0]
            if top in FORBIDDEN[package]:
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


@pytest.mark.parametrize("package", ["protocol", "httpmetrics", "portolan", "varpd"])
def test_package_keeps_to_its_layer(package: str) -> None:
    assert (ROOT / package).is_dir()
    assert violations(package) == []


def test_cni_imports_neither_portolan_nor_varpd() -> None:
    if not (ROOT / "cni").is_dir():
        pytest.skip("no cni package yet")
    assert violations("cni") == []


def test_lab_is_where_portolan_and_varpd_meet() -> None:
    tops = {
        name.split(".", 1)[0]
        for path in (ROOT / "lab").rglob("*.py")
        for _, name in imports_of(path)
    }
    assert {"portolan", "varpd"} <= tops


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "portolan" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "portolan" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "import json\n"
        "from .. import model\n"
        "from ..service import Directory\n"
        "def later():\n"
        "    import varpd.daemon\n"
        "    from lab import open_cluster\n"
        "class K:\n"
        "    def m(self):\n"
        "        importlib.import_module('varpd.shim')\n"
    )
    names = {name for _, name in imports_of(pkg / "mod.py", tmp_path)}
    assert {"portolan.model", "portolan.service", "varpd.daemon", "lab", "varpd.shim"} <= names
    found = violations("portolan", tmp_path)
    assert [v.rsplit(" ", 1)[1] for v in found] == [
        "varpd.daemon",
        "lab",
        "lab.open_cluster",
        "varpd.shim",
    ]
