"""The import rule (docs/ARCHITECTURE.md): layers depend one way, core <- methods <- {io, quant, kernels, batching,
adapter arithmetic} <- apps, and no module imports itself back through others. Every import counts: module-level,
function-local and ``TYPE_CHECKING`` ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# (layer, module-name prefixes); a module belongs to the first entry with a matching prefix (exact name or a
# package prefix ending in ".")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("deltatune.errors", "deltatune.dtypes", "deltatune.quiet", "deltatune.atomic", "deltatune.merging", "deltatune.protocol", "deltatune.filling", "deltatune.config", "deltatune.layers",
              "deltatune.targets", "deltatune.model", "deltatune.kvcache")),
    ("methods", ("deltatune.methods", "deltatune.methods.")),
    ("extensions", ("deltatune.io", "deltatune.quant", "deltatune.ops", "deltatune.ops.", "deltatune.kernels",
                    "deltatune.batching", "deltatune.batching.", "deltatune.merge_checkpoint", "deltatune.combine", "deltatune.hotswap",
                    "deltatune.task_vectors", "deltatune.optim")),
    ("apps", ("deltatune", "deltatune.")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or (p.endswith(".") and module.startswith(p)) for p in prefixes):
            return name
    raise AssertionError(f"{module} is in no layer")


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every deltatune module ``name`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith("deltatune") and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports(name, path, known) for name, path in known.items()}
    for name in edges:  # importing a submodule runs its package's __init__ first: not an edge of ours
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer_and_imports_only_lower_or_equal_layers() -> None:
    edges = graph()
    assert len(edges) > 60
    wrong = [
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, targets in sorted(edges.items()) for b in sorted(targets) if RANK[layer_of(b)] > RANK[layer_of(a)]
    ]
    assert not wrong, "imports against the layer rule (register a strategy instead):\n" + "\n".join(wrong)


def test_no_import_cycles_counting_function_local_imports() -> None:
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_checker_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "deltatune" / "a.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from .b import g\n    from . import c\n", encoding="utf-8")
    known = {"deltatune.a": source, "deltatune.b": source, "deltatune.c": source}
    assert imports("deltatune.a", source, known) == {"deltatune.b", "deltatune.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "module", ["deltatune.layers", "deltatune.model", "deltatune.config", "deltatune.protocol", "deltatune.filling"]
)
def test_core_modules_name_no_method_class(module: str) -> None:
    """The core dispatches through the protocol: it never names a method's delta class."""
    text = modules()[module].read_text(encoding="utf-8")
    for name in ("LoraLinear", "DoraLinear", "MoraLinear", "LoraEmbedding", "BottleneckAdapter"):
        assert name not in text, f"{module} names {name}"
