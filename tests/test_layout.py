"""The shape of the code: no import cycle, data flowing one way between the stages, only the CLI layer importing
typer and rich, and no module or function too long to read (see "How the code is laid out" in the README)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fpnx"

# The stages in the order data flows; a module may import its own stage and earlier ones, never a later one.
STAGES = [
    ["fpnx.version", "fpnx.errors"],
    ["fpnx.sources"],
    ["fpnx.preprocess"],
    ["fpnx.loader"],
    ["fpnx.models"],
    ["fpnx.store"],
    ["fpnx.report"],
    ["fpnx.options"],
    ["fpnx.run"],
    ["fpnx.bench"],
    ["fpnx.render", "fpnx.cli", "fpnx.__main__", "fpnx"],
]
CLI_LAYER = {"fpnx.cli", "fpnx.render"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
LONG_REASON = "Long because"  # a function over the limit says why in its docstring, starting so


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports, function-local imports included and ``if TYPE_CHECKING:`` blocks excluded.

    ``from .pkg import thing`` counts as an import of ``pkg.thing`` when that is a module, else of ``pkg``.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    return {name: {m for m in imports_of(name, path, names) if m in names and m != name} for name, path in known.items()}


def stage_of(name: str) -> int:
    for index, prefixes in enumerate(STAGES):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no stage; add it to STAGES and to the README's layout section")


def test_the_import_graph_sees_function_local_imports_and_skips_type_checking(tmp_path):
    code = tmp_path / "probe.py"
    code.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fpnx.run import extract\n"
        "def f():\n    from .models import build\n    import fpnx.store.reader\n"
    )
    found = imports_of("fpnx.probe", code, {"fpnx.models.build", "fpnx.store.reader"})
    assert found == {"typing", "fpnx.models.build", "fpnx.store.reader"}


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_data_flows_one_way_between_the_stages():
    edges = graph()
    backwards = [f"{source} imports {target}" for source, targets in edges.items() for target in targets
                 if stage_of(target) > stage_of(source)]
    assert not backwards, "a stage imports a later one:\n" + "\n".join(sorted(backwards))


def test_only_the_cli_layer_imports_typer_and_rich():
    known = modules()
    names = set(known)
    offenders = [
        f"{name} imports {imported}"
        for name, path in known.items() if name not in CLI_LAYER
        for imported in imports_of(name, path, names)
        if imported.split(".")[0] in ("typer", "rich", "click")
    ]
    assert not offenders, offenders


def test_modules_and_functions_are_short_enough_to_read():
    too_long = []
    for name, path in modules().items():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body[1:] if ast.get_docstring(node) else node.body
            length = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if length > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
