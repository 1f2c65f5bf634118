"""House rules that keep the package layered: the import-linter contracts of pyproject.toml (cli > pipeline > eval >
stages > gguf > backends > model, with errors/schema/atomic below them all), no import cycle anywhere in the module
graph, no module over 450 lines, and no module reaching into another module's private (underscore) names."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "moepack"
MAX_LINES = 450


def _module(path: Path) -> str:
    """Dotted name of a source file: src/moepack/gguf/writer.py → moepack.gguf.writer; tests/x.py → tests.x."""
    for base in (SRC, ROOT):
        if path.is_relative_to(base):
            return ".".join(p for p in path.relative_to(base).with_suffix("").parts if p != "__init__")
    return path.stem


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))


def test_import_contracts_hold() -> None:
    """`lint-imports` (import-linter, the venv's own) keeps every contract of pyproject.toml."""
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.is_file(), f"{exe} missing: pip install import-linter (the test extra)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def import_cycles(package: str) -> list[list[str]]:
    """Every import cycle of `package`: the strongly connected components of its module graph with more than one
    module, and modules that import themselves. Imports inside functions count (they run, and a cycle of them is
    still a cycle to read), and so do imports under `if TYPE_CHECKING:` (a type-only loop is still two modules
    that cannot be read apart; move the shared type below both). Tarjan's algorithm, iterative."""
    import grimp

    graph = grimp.build_graph(package, exclude_type_checking_imports=False, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = [[m] for m, out in edges.items() if m in out]
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(edges[v]):
                work.append((v, i + 1))
                w = edges[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while not comp or comp[-1] != v:
                    comp.append(stack.pop())
                    on_stack.discard(comp[-1])
                if len(comp) > 1:
                    cycles.append(sorted(comp))
            if work:  # back in the caller: its low link takes the callee's
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return cycles


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(f"  {len(c)} modules: {', '.join(c)}" for c in cycles)


def test_no_import_cycle() -> None:
    """No module imports itself, directly or around a loop: each cycle is listed (move the shared part below both,
    a type-only import included)."""
    cycles = import_cycles("moepack")
    assert not cycles, f"import cycles in src/moepack:\n{_describe(cycles)}"


def test_the_cycle_check_catches_cycles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cycle through a function-level import and one through a type-only import are found; a parent package
    importing its children (not a cycle unless a child imports the parent back) is not."""
    pkg = tmp_path / "cyclic_probe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic_probe import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclic_probe import c\n")
    (pkg / "c.py").write_text("import cyclic_probe.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclic_probe import e\n")
    (pkg / "e.py").write_text("from cyclic_probe import d\n")
    (pkg / "sub" / "__init__.py").write_text("from cyclic_probe.sub import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "f.py").write_text("import cyclic_probe.f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cycles = import_cycles("cyclic_probe")
    assert sorted(cycles) == [["cyclic_probe.a", "cyclic_probe.b", "cyclic_probe.c"], ["cyclic_probe.d", "cyclic_probe.e"],
                              ["cyclic_probe.f"]], cycles


def test_no_module_is_too_long() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


PIPELINE_MAX_FUNCTION_LINES = 50
PIPELINE_MAX_PARAMS = 8


def _long_functions(path: Path) -> list[str]:
    """Functions of `path` over PIPELINE_MAX_FUNCTION_LINES lines (decorators to last line) or with more than
    PIPELINE_MAX_PARAMS parameters (self and cls not counted)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if (n := node.end_lineno - start + 1) > PIPELINE_MAX_FUNCTION_LINES:
                found.append(f"{node.name}: {n} lines")
            if len(params) > PIPELINE_MAX_PARAMS:
                found.append(f"{node.name}: {len(params)} parameters")
    return found


def test_pipeline_functions_are_small() -> None:
    """The compress pipeline reads top to bottom: no function in pipeline/ over 50 lines or 8 parameters."""
    bad = {p.name: f for p in sorted((PACKAGE / "pipeline").glob("*.py")) if (f := _long_functions(p))}
    assert not bad, f"split these pipeline functions: {bad}"


def test_the_function_check_catches_long_ones(tmp_path: Path) -> None:
    f = tmp_path / "probe.py"
    f.write_text("def wide(a, b, c, d, e, f, g, h, i):\n    pass\n\n\nclass C:\n    def ok(self, a, b, c, d, e, f, g, h):\n"
                 + "        x = 1\n" * 47 + "\n\ndef tall():\n" + "    x = 1\n" * 50)
    assert sorted(_long_functions(f)) == ["tall: 51 lines", "wide: 9 parameters"], _long_functions(f)


def _private_uses(path: Path) -> list[str]:
    """`from moepack.x import _y`, `m._y` on an imported moepack module m, and private moepack modules imported
    from outside their own package."""
    me = _module(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}  # local name → moepack module it names
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moepack":
            found += _private_module(me, node.module, node.lineno)
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "moepack":
                    found += _private_module(me, a.name, node.lineno)
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "moepack"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    return found


def _private_module(me: str, target: str, line: int) -> list[str]:
    parts = target.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and not p.startswith("__") and not me.startswith(".".join(parts[:i]) + "."):
            return [f"line {line}: imports the private module {target}"]
    return []


def test_no_private_names_across_modules() -> None:
    bad = {str(p.relative_to(ROOT)): uses for p in _sources() if (uses := _private_uses(p))}
    assert not bad, f"private names used outside their module (make them public or move them): {bad}"


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    """The AST scan flags each kind of private use (a scan that finds nothing proves nothing otherwise)."""
    f = tmp_path / "probe.py"
    f.write_text("from moepack.gguf.kernels import _lib\nimport moepack.gguf.writer as go\ngo._encode\n"
                 "from moepack.model.arch._common import L\nfrom moepack import __version__\n")
    found = " | ".join(sorted(_private_uses(f)))
    assert found.count("line ") == 3 and "import _lib" in found and "go._encode" in found and "_common" in found, found
