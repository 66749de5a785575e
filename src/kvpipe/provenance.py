"""Hashes of the kvpipe code a workflow script runs, so a code change reruns exactly the rules it touches.

The code of a script is the script itself plus the transitive closure of the kvpipe modules it
imports, read from the source with ``ast`` (imports inside functions included, since they run
when the function does). Importing ``kvpipe.a.b`` also runs ``kvpipe`` and ``kvpipe.a``, so
parent packages belong to the closure. Files are read on every call (they may change between calls); only the
parse of a file's bytes is cached, by those bytes.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "kvpipe"
SRC = Path(__file__).resolve().parents[1]


def _candidates(name: str, src: Path) -> tuple[Path, Path]:
    base = src.joinpath(*name.split("."))
    return base.with_suffix(".py"), base / "__init__.py"


def _is_module(name: str, src: Path) -> bool:
    return any(path.is_file() for path in _candidates(name, src))


def module_path(name: str, src: Path) -> Path:
    """The file of module ``name`` under ``src``: ``a/b.py`` or ``a/b/__init__.py``."""
    for path in _candidates(name, src):
        if path.is_file():
            return path
    raise ModuleNotFoundError(f"no module named {name} under {src}", name=name)


def _package(path: Path, src: Path) -> list[str] | None:
    """The package a file under ``src`` belongs to, as name parts; None outside ``src``."""
    try:
        rel = path.resolve().relative_to(src.resolve())
    except ValueError:
        return None
    return list(rel.with_suffix("").parts[:-1])  # a/b/m.py -> a.b; a/b/__init__.py -> a.b


def _from_base(level: int, module: str | None, package: list[str] | None) -> str | None:
    """The absolute module a ``from ... import`` statement imports from; None if unresolvable."""
    if not level:
        return module
    if package is None or level > len(package):
        return None
    parts = package[: len(package) - level + 1]
    return ".".join(parts + [module] if module else parts)


@cache
def _statements(source: bytes) -> tuple[tuple[int | None, str | None, tuple[str, ...]], ...]:
    """Every import statement of a source, at any depth: (None, None, names) for ``import a, b``, (level, module,
    names) for ``from ...module import names``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.append((None, None, tuple(alias.name for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module, tuple(alias.name for alias in node.names)))
    return tuple(out)


def kvpipe_imports(path: Path, src: Path) -> set[str]:
    """The kvpipe modules a Python file imports anywhere in it.

    ``from p import x`` imports module ``p.x`` when that is a module under ``src``, else ``p``.
    Relative imports resolve against the file's package under ``src``.
    """
    package = _package(path, src)
    found: set[str] = set()
    for level, module, names in _statements(path.read_bytes()):
        if level is None:
            found.update(names)
        elif base := _from_base(level, module, package):
            found.update(f"{base}.{name}" if name != "*" and _is_module(f"{base}.{name}", src) else base for name in names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def import_closure(roots: Iterable[str], src: Path) -> list[str]:
    """The sorted kvpipe modules that importing ``roots`` runs: their imports and parent packages, transitively."""
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        todo.extend(([parent] if parent else []) + sorted(kvpipe_imports(module_path(name, src), src)))
    return sorted(seen)


def _digest(own: bytes, modules: Iterable[str], src: Path) -> str:
    digest = hashlib.sha256(own)
    for name in import_closure(modules, src):
        data = module_path(name, src).read_bytes()
        digest.update(f"\n{name} {len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def script_hash(script: Path, src: Path | None = None, modules: Iterable[str] = ()) -> str:
    """SHA-256 (first 16 hex digits) over a script and the kvpipe modules its imports run, and those that importing
    ``modules`` runs (what a script imports by name, as kvpipe.stages imports a stage's modules)."""
    src = SRC if src is None else src
    return _digest(script.read_bytes(), kvpipe_imports(script, src) | set(modules), src)


def module_hash(*modules: str, src: Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) over the kvpipe modules that importing ``modules`` runs."""
    src = SRC if src is None else src
    return _digest(b"", modules, src)
