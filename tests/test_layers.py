"""The package's shape: imports point one way, modules stay small, the CLI only translates."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "healthyluncher"
MAX_LINES = 420  # "about 400"


def imports_of(path: Path) -> set[str]:
    """Every healthyluncher module this one imports, at top level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "healthyluncher":  # modules, not the names __init__ exports
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            elif node.module.startswith("healthyluncher."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("healthyluncher."):
                    found.add(alias.name.split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path, name]))
        if name in done:
            return
        for other in sorted(edges[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


def test_no_module_is_much_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_cli_uses_the_public_api_only():
    for name in ("cli", "cli_app", "cli_setup", "cli_output", "cli_teaching", "cli_streams"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        modules = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not modules & {"numpy", "onnx", "onnxruntime", "PIL"}, name
        inner = imports_of(PACKAGE / f"{name}.py")
        allowed = {"api", "cli_app", "cli_output", "cli_setup", "cli_teaching", "errors", "events"}
        allowed |= {"cli_streams"}
        allowed |= {"photos"}
        allowed |= {"version"}
        assert inner <= allowed | {"settings"}, (name, inner - allowed)
        assert "store" not in inner and "Files" not in (PACKAGE / f"{name}.py").read_text()


def test_low_layers_never_import_high_ones():
    layers = [
        {"errors", "events", "version", "memory", "template", "jsonform"},
        {"settings", "photos", "state", "fileio", "child", "openers"} | {"heldlocks", "signalhold"},
        {"segments", "weightsfile"},
        {"meta", "store", "runtime", "imaging", "thumbnails", "arguments", "external"},
        {"records", "trainers", "numpy_trainer", "graph", "linearhead", "decompose", "cuts"}
        | {"rewrites", "artifacts"},
        {"training"},
        {"heads", "quantize", "examples", "embedder", "modelsetup", "precision", "backupchecks"},
        {"personal", "predictor", "headfit"},
        {"personalizing", "bases", "archive", "teaching", "exporting"},
        {"backup"},
        {"api"},
        {"tasks"},
        {"cli_output", "cli_streams", "cli_app", "cli_setup", "cli_teaching", "cli", "__main__"},
    ]
    rank = {name: i for i, group in enumerate(layers) for name in group}
    edges = graph()
    assert set(edges) - set(rank) == set(), "every module needs a layer here"
    for name, imported in edges.items():
        for other in imported:
            assert rank[other] <= rank[name], f"{name} (layer {rank[name]}) imports {other}"


def test_the_readme_layer_table_names_every_module_and_no_layer_imports_a_higher_one():
    """README's "How it works" table of layers left out 19 of the package's modules
    (cli_teaching, tasks, teaching, headfit, state, fileio...), where it says the modules
    import one way through those layers."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| layer | modules | job |") :]
    rows = table[: table.index("\n\n")].splitlines()[2:]
    rank = {
        module: len(rows) - i  # the table lists the highest layer first
        for i, row in enumerate(rows)
        for module in re.findall(r"`(\w+)`", row.split("|")[2])
    }
    edges = graph()
    assert set(edges) - set(rank) == set(), "modules the README's table leaves out"
    assert set(rank) - set(edges) == set(), "names in the README's table that are no module"
    for name, imported in edges.items():
        for other in imported:
            assert rank[other] <= rank[name], f"{name} imports {other}, a higher layer"
