"""The layout rules of docs/ARCHITECTURE.md, checked on the source: small modules and
functions, commands as the only edges, dependencies pointing one way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("plumbing", "preprocessing", "hmil")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Helpers of the command modules that live beside the cores they describe.
EDGE_HELPERS = {"plumbing.cli"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


SOURCES = {
    module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
}
# The commands: `python -m hmil.train`, `python -m preprocessing.patch`, ...
COMMANDS = {
    name
    for name, path in SOURCES.items()
    if path.parent.name in ("hmil", "preprocessing") and path.name != "__init__.py"
}


def tree_of(name: str) -> ast.Module:
    return ast.parse(SOURCES[name].read_text(), filename=str(SOURCES[name]))


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_commands_are_the_top_level_modules_of_each_stage():
    assert {"hmil.train", "hmil.evaluate", "hmil.splits", "hmil.heatmaps", "hmil.compare",
            "hmil.deploy", "hmil.predict", "preprocessing.patch", "preprocessing.extract",
            "preprocessing.synthetic", "preprocessing.import_features"} <= COMMANDS  # fmt: skip
    for name in COMMANDS:
        assert "__main__" in SOURCES[name].read_text(), f"{name} is not a command"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_modules_and_functions_are_small(name):
    source = SOURCES[name].read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name} has over {MAX_MODULE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree_of(name))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("name", sorted(set(SOURCES) - COMMANDS - EDGE_HELPERS))
def test_cores_never_parse_arguments_nor_import_a_command(name):
    imports = imported_modules(tree_of(name))
    assert "argparse" not in imports, f"{name} is core code but imports argparse"
    assert not imports & COMMANDS, f"{name} imports the command(s) {sorted(imports & COMMANDS)}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("plumbing", ("preprocessing", "hmil")), ("preprocessing", ("hmil",))],
)
def test_dependencies_point_from_hmil_to_preprocessing_to_plumbing(package, forbidden):
    for name in (n for n in SOURCES if n.split(".")[0] == package):
        wrong = {m for m in imported_modules(tree_of(name)) if m.split(".")[0] in forbidden}
        assert not wrong, f"{name} imports {sorted(wrong)}"


# hmil's stage packages, lowest first: each may import those before it, none after it.
HMIL_LAYERS = ("hmil.data", "hmil.models", "hmil.training", "hmil.evaluation")


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


@pytest.mark.parametrize("layer", HMIL_LAYERS[:-1])
def test_hmil_stages_depend_on_lower_stages_only(layer):
    """data ← models ← training ← evaluation, as in docs/ARCHITECTURE.md."""
    higher = HMIL_LAYERS[HMIL_LAYERS.index(layer) + 1 :]
    for name in (n for n in SOURCES if in_package(n, layer)):
        imports = imported_modules(tree_of(name))
        wrong = {m for m in imports if any(in_package(m, h) for h in higher)}
        assert not wrong, f"{name} imports {sorted(wrong)}, a later stage than {layer}"


@pytest.mark.parametrize(
    ("leaf", "allowed"),
    [
        ("preprocessing.features.encoder_registry", ("plumbing",)),
        ("hmil.presets", ()),  # package data: readable from every stage
    ],
)
def test_registries_and_presets_are_leaves(leaf, allowed):
    """What every stage reads imports nothing of the project above plumbing."""
    ours = {m for m in imported_modules(tree_of(leaf)) if m.split(".")[0] in PACKAGES}
    wrong = {m for m in ours if m.split(".")[0] not in allowed}
    assert not wrong, f"{leaf} imports {sorted(wrong)}"


def module_level_imports(name: str) -> set[str]:
    """The project modules `name` imports when it is loaded (not those imported lazily)."""
    body = [node for node in tree_of(name).body if isinstance(node, ast.Import | ast.ImportFrom)]
    imports = imported_modules(ast.Module(body=body, type_ignores=[]))
    return {m for m in imports if m in SOURCES and m != name}


def test_no_module_imports_itself_in_a_circle():
    """A circle works only by statement order (encoders ↔ encoder_zoo once did)."""
    graph = {name: module_level_imports(name) for name in SOURCES}
    circles = []
    for start in sorted(graph):
        seen, stack = set(), [(start, (start,))]
        while stack:
            module, path = stack.pop()
            for nxt in sorted(graph[module]):
                if nxt == start:
                    circles.append(" → ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not circles, f"import circles: {circles[:3]}"


DOC_CITATION = re.compile(r"docs/([\w-]+\.md)(?:\s*\(|,)?\s*(?:\"([^\"]+)\")?")


def test_documents_the_code_cites_exist_with_their_sections():
    """A citation `docs/method.md ("Losses")` names a file and a heading that exist."""
    cited = {
        (doc, section)
        for path in SOURCES.values()
        for doc, section in DOC_CITATION.findall(path.read_text())
    }
    assert ("method.md", "Model") in cited
    for doc, section in sorted(cited):
        text = (ROOT / "docs" / doc).read_text() if (ROOT / "docs" / doc).is_file() else None
        assert text is not None, f"the code cites docs/{doc}, which does not exist"
        headings = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
        assert not section or section in headings, f"docs/{doc} has no section {section!r}"
