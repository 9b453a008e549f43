"""The layout of ``benchmarks/``: its modules' imports form no cycle, and no module takes a private name
(``_x``) from another. Read from the source with ``ast``: nothing is imported or run, so this is fast."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRST_PARTY = ("benchmarks", "rate_tuning", "proofs_check")


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: pathlib.Path) -> bool:
    """Whether ``name`` is a first-party module or package under ``root`` (looked up on disk, not imported)."""
    if name.split(".")[0] not in FIRST_PARTY:
        return False
    p = root.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: pathlib.Path, package: str = "benchmarks"):
    """``(graph, private)`` of every module under ``root/package``: ``graph[m]`` the modules of ``package``
    that ``m`` imports (at the top or inside a function alike); ``private`` the ``(module, line, what)`` where
    a module imports a name starting with ``_`` from another module (``from m import _x``) or reads one from
    an imported first-party module (``m._x``)."""
    graph, private = {}, []
    for path in sorted((root / package).rglob("*.py")):
        name = _module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        deps, aliases = set(), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    deps.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(node, name, path.name == "__init__.py")
                deps.add(src)
                for a in node.names:
                    full = f"{src}.{a.name}"
                    if _is_module(full, root):
                        deps.add(full)
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__") and src != name:
                        private.append((name, node.lineno, f"from {src} import {a.name}"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _is_module(aliases.get(node.value.id, ""), root) and aliases[node.value.id] != name):
                private.append((name, node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
        graph[name] = {d for d in deps if d.split(".")[0] == package and _is_module(d, root)
                       and d != package and d != name}
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_benchmarks_imports_have_no_cycle_and_no_private_names():
    graph, private = scan(ROOT)
    assert {"benchmarks.run", "benchmarks.common", "benchmarks.studies.convnet_study"} <= set(graph)
    assert cycles(graph) == []
    assert private == []


def test_the_dependency_direction():
    """``common`` depends on no other benchmark module; nothing imports ``run``; the studies import only
    ``common`` (and the PyTorch peer), never ``run``."""
    graph, _ = scan(ROOT)
    assert graph["benchmarks.common"] == set()
    assert not [m for m, deps in graph.items() if "benchmarks.run" in deps]
    for m, deps in graph.items():
        if m.startswith("benchmarks.studies."):
            assert deps <= {"benchmarks.common", "benchmarks.torch_reference"}, (m, deps)


@pytest.mark.parametrize("case", ["cycle", "private", "private attribute"])
def test_the_checks_catch_what_they_look_for(tmp_path, case):
    """Control: a cycle through a lazy import, a private name imported, or one read off an imported module."""
    pkg = tmp_path / "benchmarks"
    (pkg / "studies").mkdir(parents=True)
    for f in ("__init__.py", "studies/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "common.py").write_text("def _helper():\n    pass\n\n\ndef helper():\n    pass\n")
    study = {"cycle": "def f():\n    from benchmarks.run import main\n",
             "private": "from benchmarks.common import _helper\n",
             "private attribute": "from benchmarks import common\n\nx = common._helper\n"}[case]
    (pkg / "studies" / "study.py").write_text("from benchmarks.common import helper\n" + study)
    (pkg / "run.py").write_text("def main():\n    from benchmarks.studies import study\n")
    graph, private = scan(tmp_path)
    if case == "cycle":
        assert cycles(graph) == [["benchmarks.run", "benchmarks.studies.study", "benchmarks.run"]]
        assert private == []
    else:
        assert cycles(graph) == []
        assert [(m, what) for m, _, what in private] == [("benchmarks.studies.study", "benchmarks.common._helper")
                                                         if case == "private attribute" else
                                                         ("benchmarks.studies.study",
                                                          "from benchmarks.common import _helper")]


def test_the_readme_names_only_results_that_exist():
    """``benchmarks/README.md`` points only at files kept in ``benchmarks/results`` (``results/NAME.json``,
    ``results/NAME.{json,md}``, or a ``NAME`` in the table of kept records)."""
    import re

    text = (ROOT / "benchmarks" / "README.md").read_text()
    kept = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()}
    named = {m.group(1) + (m.group(2) or "") for m in re.finditer(r"results/([\w-]+)(\.json|\.md)?", text)}
    named |= set(re.findall(r"^\| `([\w-]+(?:\.json)?)` \| [^|]*(?:host|EPYC|CPUs)", text, re.M))
    missing = sorted(n for n in named if not (n in kept or f"{n}.json" in kept or f"{n}.md" in kept))
    assert len(named) >= 8 and missing == []
