"""The layout's rules, read off the source with ``ast``: dependencies in one direction, no import cycle, no
module reaching into another's private names, no oversized module (docs/design.md).

Every ``import`` counts, including those inside functions (a deferred import still makes a cycle).
"""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rate_tuning", "proofs_check", "benchmarks")
LAYERS = {"rate_tuning": {"rate_tuning"}, "proofs_check": {"rate_tuning", "proofs_check"},
          "benchmarks": {"rate_tuning", "proofs_check", "benchmarks"}}
"""What each package may import of the project: rate_tuning knows nothing of the checks or benchmarks."""

MAX_LINES = {"rate_tuning/train.py": 500}
MAX_LINES_DEFAULT = {"rate_tuning": 600}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(name: str, modules: dict) -> str | None:
    """The project module ``name`` refers to (a module, or the module holding an imported attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: pathlib.Path, modules: dict) -> tuple[set[str], list[str]]:
    """``(project modules imported, private names reached into)`` of one file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    deps: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> project module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = resolve(a.name, modules)
                if target:
                    deps.add(target)
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                target = resolve(full, modules) if full in modules else resolve(base, modules)
                if target:
                    deps.add(target)
                    if full in modules:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{me}: from {base} import {a.name}")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
              and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append(f"{me}: {aliases[node.value.id]}.{node.attr}")
    deps.discard(me)
    return deps, private


def graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = project_modules()
    edges, private = {}, []
    for name, path in modules.items():
        edges[name], p = imports_of(path, modules)
        private += p
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def is_package_init_edge(a: str, b: str) -> bool:
    """``pkg/__init__.py`` re-exporting its submodules, and submodules importing siblings through the package:
    the package and its own submodules are one unit, not a cycle of modules."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycle():
    edges, _ = graph()
    edges = {a: {b for b in bs if not is_package_init_edge(a, b)} for a, bs in edges.items()}
    assert cycles(edges) == []


def test_cycle_detection_catches_a_cycle():
    """Control: the detector finds a planted two-module cycle and a three-module one."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == [["x", "y", "z"]]


def test_no_module_imports_a_private_name_of_another():
    _, private = graph()
    assert private == []


def test_private_name_detection_catches_both_forms(tmp_path, monkeypatch):
    """Control: ``from m import _x`` and ``m._x`` are both reported."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("_x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg.a import _x\nfrom pkg import a\ny = a._x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)  # module names relative to it
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
               "pkg.b": tmp_path / "pkg" / "b.py"}
    _, private = imports_of(tmp_path / "pkg" / "b.py", modules)
    assert private == ["pkg.b: from pkg.a import _x", "pkg.b: pkg.a._x"]


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    edges, _ = graph()
    wrong = sorted(f"{a} -> {b}" for a, bs in edges.items() if a.split(".")[0] == package
                   for b in bs if b.split(".")[0] not in LAYERS[package])
    assert wrong == []


def test_no_oversized_module():
    too_long = []
    for name, path in project_modules().items():
        rel = str(path.relative_to(ROOT))
        limit = MAX_LINES.get(rel, MAX_LINES_DEFAULT.get(name.split(".")[0]))
        n = len(path.read_text().splitlines())
        if limit is not None and n > limit:
            too_long.append(f"{rel}: {n} lines > {limit}")
    assert too_long == []


def test_benchmarks_depend_on_common_and_nothing_on_run():
    """``benchmarks.common`` imports no other benchmark module; nothing imports ``benchmarks.run``; the
    studies import only ``common`` and the PyTorch peer."""
    edges, _ = graph()
    bench = {a: {b for b in bs if b.startswith("benchmarks.")} for a, bs in edges.items() if a.startswith("benchmarks.")}
    assert bench["benchmarks.common"] == set()
    assert [m for m, deps in bench.items() if "benchmarks.run" in deps] == []
    for m, deps in bench.items():
        if m.startswith("benchmarks.studies."):
            assert deps <= {"benchmarks.common", "benchmarks.torch_reference", "benchmarks.studies"}, (m, deps)


def test_lazy_imports_count_as_edges(tmp_path):
    """Control: an import inside a function is an edge (a deferred import still closes a cycle)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "run.py").write_text("def main():\n    from pkg import study\n")
    (tmp_path / "pkg" / "study.py").write_text("def f():\n    from pkg.run import main\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.run": tmp_path / "pkg" / "run.py",
               "pkg.study": tmp_path / "pkg" / "study.py"}
    sys.modules[__name__].ROOT, root = tmp_path, ROOT
    try:
        edges = {name: imports_of(path, modules)[0] for name, path in modules.items()}
    finally:
        sys.modules[__name__].ROOT = root
    edges = {a: {b for b in bs if not is_package_init_edge(a, b)} for a, bs in edges.items()}
    assert cycles(edges) == [["pkg.run", "pkg.study"]]


def test_the_benchmarks_readme_names_only_results_that_exist():
    """``benchmarks/README.md`` points only at files kept in ``benchmarks/results`` (``results/NAME.json``,
    ``results/NAME.{json,md}``, or a ``NAME`` in the table of kept records)."""
    import re

    text = (ROOT / "benchmarks" / "README.md").read_text()
    kept = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()}
    named = {m.group(1) + (m.group(2) or "") for m in re.finditer(r"results/([\w-]+)(\.json|\.md)?", text)}
    named |= set(re.findall(r"^\| `([\w-]+(?:\.json)?)` \| [^|]*(?:host|EPYC|CPUs)", text, re.M))
    missing = sorted(n for n in named if not (n in kept or f"{n}.json" in kept or f"{n}.md" in kept))
    assert len(named) >= 8 and missing == []
