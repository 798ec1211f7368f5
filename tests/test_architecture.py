"""The layers of DESIGN.md, checked on the source (every import of every module, read from
its AST: top-level, in functions and under TYPE_CHECKING alike).

- protocol/ imports nothing from merge/ or node/; merge/ never imports node/;
- no import loop between modules;
- product code never imports the demo's toy models and tasks (merge/toy/): evaluation,
  search and fusion work with any tokenizer; only the demo and its CLI module use them.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"hivemerge": "hivemerge", "protocol": "hivemerge.protocol", "merge": "hivemerge.merge", "node": "hivemerge.node"}
# The demo's tiny character model, its synthetic tasks and experts, and the heterogeneous test expert.
TOY = "hivemerge.merge.toy"  # the package and its modules
DEMO = {"hivemerge.node.demo", "hivemerge.node.cli.demo"}  # the demo itself may use them


def is_toy(module: str) -> bool:
    return module == TOY or module.startswith(TOY + ".")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every hivemerge module ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hivemerge"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hivemerge"))
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_the_layers_import_only_downwards():
    edges = [(a, b) for a, targets in graph().items() for b in targets]
    assert [(a, b) for a, b in edges if a.startswith("hivemerge.protocol")
            and b.startswith(("hivemerge.merge", "hivemerge.node"))] == []
    assert [(a, b) for a, b in edges if a.startswith("hivemerge.merge") and b.startswith("hivemerge.node")] == []


def test_no_import_loops():
    edges = graph()
    loops, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                loops.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert loops == []


def test_product_code_never_imports_the_toy_models():
    edges = graph()
    toy_imports = {(a, b) for a, targets in edges.items() for b in targets
                   if is_toy(b) and not is_toy(a) and a not in DEMO}
    assert sorted(toy_imports) == []


def test_the_checker_sees_a_loop_and_a_layer_breach(tmp_path, monkeypatch):
    """The checks above can fail: a module pair that imports each other is a loop, and a
    protocol module importing node/ is a breach, a merge module importing
    merge/toy is product code on the toy."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "protocol" / "a.py").write_text("from hivemerge.node import b\n")
    (tmp_path / "node" / "b.py").write_text("def f():\n    from hivemerge.protocol import a\n")
    (tmp_path / "merge" / "toy").mkdir()
    (tmp_path / "merge" / "toy" / "c.py").write_text("")
    (tmp_path / "merge" / "d.py").write_text("from hivemerge.merge.toy import c\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    edges = graph()
    assert edges["hivemerge.protocol.a"] == {"hivemerge.node.b"} and edges["hivemerge.node.b"] == {"hivemerge.protocol.a"}
    for check in (test_the_layers_import_only_downwards, test_no_import_loops, test_product_code_never_imports_the_toy_models):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a tree that breaks it")
