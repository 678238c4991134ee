"""Measure the package's shape: lines per layer, import cycles between modules, and imports that go up a layer.

    uv run --inexact python scratch/import_graph.py [package root (default: this checkout)] [--before]

``--before`` classifies the modules as they were named before the redesign into rooms (``nnterp/testing``
holding the harness, the vLLM backend in ``nnterp/standardized/vllm_*``, ...): check out that commit in another
directory and pass it as the root. Cycles are strongly connected components of the module import graph (type-
checking imports included); an upward import is one from a module of a lower layer to one of a higher layer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

LAYERS = ("core", "backends", "models", "tools", "faces")

CURRENT = {  # module prefix -> layer, longest prefix wins
    "nnterp.core": "core", "nnterp.testing": "core", "nnterp.backends": "backends", "nnterp.standardized": "models",
    "nnterp.interventions": "tools", "nnterp.extraction": "tools", "nnterp.prompts": "tools",
    "nnterp.display": "tools", "nnterp.validation": "tools", "nnterp": "faces",
}
BEFORE = {
    "nnterp.rename": "core", "nnterp.layout": "core", "nnterp.accessors": "core", "nnterp.attention": "core",
    "nnterp.forward_order": "core", "nnterp.padding": "core", "nnterp.tracing": "core",
    "nnterp.standardized.positions": "core", "nnterp.testing.tiny": "core", "nnterp.testing.tiny_configs": "core",
    "nnterp.testing.tokenizer": "core", "nnterp.testing.smollm2": "core", "nnterp.testing": "harness",
    "nnterp.layout.__main__": "harness", "nnterp.distributed": "backends", "nnterp.standardized.vllm_": "backends",
    "nnterp.standardized.readonly": "backends", "nnterp.extraction": "backends", "nnterp.extraction.shards": "tools",
    "nnterp.standardized": "models", "nnterp.interventions": "tools", "nnterp.display": "tools",
    "nnterp.validation": "tools", "nnterp": "faces",
}


def layer_of(module: str, table: dict[str, str]) -> str:
    matches = [prefix for prefix in table if module == prefix or module.startswith(prefix + ".")
               or prefix.endswith("_") and module.startswith(prefix)]
    return table[max(matches, key=len)]


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[set[str]]:
    """Tarjan's components of size > 1."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.find_modules_directly_imported_by(node) & modules:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(10_000)
    for node in sorted(modules):
        if node not in index:
            visit(node)
    return found


def main() -> None:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    root = Path(args[0] if args else Path(__file__).resolve().parents[1]).resolve()
    table = BEFORE if "--before" in sys.argv else CURRENT
    sys.path.insert(0, str(root))
    graph = grimp.build_graph("nnterp", include_external_packages=False)
    modules = {module for module in graph.modules if module.startswith("nnterp")}
    lines: dict[str, int] = {}
    for module in modules:
        path = root / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = root / module.replace(".", "/") / "__init__.py"
        layer = layer_of(module, table)
        lines[layer] = lines.get(layer, 0) + len(path.read_text().splitlines())
    rank = {name: position for position, name in enumerate(LAYERS)}
    upward = sorted(
        (importer, imported) for importer in modules for imported in graph.find_modules_directly_imported_by(importer)
        if imported in modules and layer_of(importer, table) in rank and layer_of(imported, table) in rank
        and rank[layer_of(importer, table)] < rank[layer_of(imported, table)]
    )
    into_harness = sorted(
        (importer, imported) for importer in modules for imported in graph.find_modules_directly_imported_by(importer)
        if imported in modules and layer_of(imported, table) == "harness" and layer_of(importer, table) != "harness"
    )
    cycles = strongly_connected(graph, modules)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{root} at {commit}: {len(modules)} modules, {sum(lines.values())} lines")
    for layer in (*LAYERS, "harness"):
        if layer in lines:
            print(f"  {layer:9} {lines[layer]:6} lines")
    print(f"cycles: {len(cycles)}")
    for component in cycles:
        print("  " + " <-> ".join(sorted(component)))
    print(f"upward imports: {len(upward)}")
    for importer, imported in upward:
        print(f"  {importer} -> {imported}")
    print(f"package modules importing the harness: {len(into_harness)}")
    for importer, imported in into_harness:
        print(f"  {importer} -> {imported}")


if __name__ == "__main__":
    main()
