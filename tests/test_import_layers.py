"""The package's layers import only downward, and no import circle exists (docs/architecture.md,
"Layers"). Every import of one package module by another counts, at module level or inside a
function; a test that builds a small upward import checks that the rule can fail."""
import ast
import os
from typing import Dict, List, Set, Tuple

from tiny import REPO

PACKAGE = "csgr_distill"
ROOT = os.path.join(REPO, "projects", PACKAGE)

#: bottom to top; a module belongs to the layer of its longest matching prefix and may import
#: modules of its own layer or of a layer below
LAYERS: List[Tuple[str, ...]] = [
    # schema and plain pieces: no package imports of note
    ("config", "outputs", "detectors", "layers"),
    # data, checkpoints, evaluators
    ("checkpoint", "backbone_weights", "data", "evaluation"),
    # the tools' config pipeline and errors; the detectors the project adds
    ("cli", "modeling", "detr_port"),
    # how each detector family is recorded
    ("records",),
    # the teacher: built from its config, strictly loaded, frozen
    ("teacher", "inherit"),
    # the methods (and the teacher-vs-baseline check, which builds a teacher)
    ("distillers", "evaluation.teacher_check"),
    # Distill* meta-architectures
    ("meta_arch",),
    # training, export, pictures (each method draws its own: vis/<method>.py)
    ("engine", "export", "vis"),
    # the benchmarks
    ("benchmark",),
]


def module_files() -> Dict[str, Tuple[str, bool]]:
    """dotted module name (without the package) -> (path, is a package's __init__)."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                is_pkg = rel[-1] == "__init__"
                if is_pkg:
                    rel = rel[:-1]
                out[".".join(rel)] = (os.path.join(dirpath, f), is_pkg)
    return out


def imports_of(module: str, path: str, is_pkg: bool, known: Set[str]) -> Set[str]:
    """The package modules ``module`` imports (relative or absolute, anywhere in the file)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if module else []
                base = parts if is_pkg else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module[len(PACKAGE) + 1:]
            else:
                continue
            for alias in node.names:  # "from . import x" imports the module x
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    out.add(alias.name[len(PACKAGE) + 1:])
    return {m for m in out if m in known and m != module}


def layer_of(module: str, layers=LAYERS) -> int:
    best, found = -1, None
    for index, prefixes in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), index
    assert found is not None, f"{PACKAGE}.{module} is in no layer of LAYERS: add it"
    return found


def upward_imports(graph: Dict[str, Set[str]], layers=LAYERS) -> List[str]:
    return [f"{PACKAGE}.{src} (layer {layer_of(src, layers)}) imports {PACKAGE}.{dst} "
            f"(layer {layer_of(dst, layers)})"
            for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
            if src and layer_of(dst, layers) > layer_of(src, layers)]


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def package_graph() -> Dict[str, Set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(m, path, is_pkg, known) for m, (path, is_pkg) in files.items()}


def test_every_module_imports_only_its_layer_or_below():
    graph = package_graph()
    graph.pop("", None)  # the package's __init__ imports everything, to register it
    assert upward_imports(graph) == []


def test_no_import_circle():
    graph = package_graph()
    graph.pop("", None)
    assert circles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    graph = {"config": {"distillers.csgr"}, "distillers.csgr": {"config"}}
    assert upward_imports(graph) == [f"{PACKAGE}.config (layer 0) imports "
                                     f"{PACKAGE}.distillers.csgr (layer 5)"]
    assert circles(graph) == [["config", "distillers.csgr"]]
