"""Checks on the source itself: the package's layering, and that nothing a user hands to finevit
is unpickled with code execution."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finevit"
PACKAGES = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists())
# package -> finevit packages it must not import (layout.md; the loop calls eval and convert)
FORBIDDEN = {
    "config": set(PACKAGES) - {"config"},
    "parallel": {"models", "data", "train", "eval", "convert", "checkpointing"},
    "models": {"data", "train", "eval", "convert", "checkpointing"},
    "data": {"models", "train", "eval", "convert", "checkpointing"},
    "eval": {"train", "convert"},
    "convert": {"train", "eval", "data"},
    "checkpointing": {"train", "eval", "data", "models", "convert"},
}


def sources(package: str = ""):
    return sorted((SRC / package).rglob("*.py"))


def finevit_imports(path: Path) -> set[str]:
    """The finevit packages a module imports (at any depth: a function-level import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("finevit.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    bad = {f"{p.relative_to(SRC)} imports finevit.{q}" for p in sources(package)
           for q in finevit_imports(p) & FORBIDDEN[package]}
    assert not bad, sorted(bad)


def test_no_unsafe_unpickling_in_the_source():
    """torch.load only with weights_only=True; no pickle.load(s); an Unpickler only as a subclass
    that overrides find_class (the allow-list for torch.distributed.checkpoint's .metadata)."""
    bad = []
    for path in sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                if (owner, node.func.attr) == ("torch", "load"):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        bad.append(f"{where}: torch.load without weights_only=True")
                if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                    bad.append(f"{where}: pickle.{node.func.attr}")
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "pickle.Unpickler" for b in node.bases):
                if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    bad.append(f"{where}: an Unpickler without an allow-list (find_class)")
    assert not bad, bad
