"""The package's layers import one way (docs/architecture.md): every module of sparse_inductor is
parsed (ast, imports inside functions included) and given its layer; an import from a lower layer
into a higher one, or a circle of imports, fails the test and is named (file:line, what it imports).
A function-level import says in a comment why it is deferred (an optional or costly dependency)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sparse_inductor"
PACKAGE = "sparse_inductor"

# From the bottom up: a module may import its own layer and those below it. A package stands for
# every module in it (a new file under lowering/ is in "lowering"); a new top-level module must be
# given a layer here.
LAYERS = [
    ("base", ["_compat", "report", "version", "activations"]),
    ("formats", ["formats"]),
    ("contracts", ["options", "registry"]),
    ("runtime", ["runtime"]),
    ("ops", ["ops"]),
    ("lowering", ["lowering"]),
    ("dispatch", ["dispatch", "measure"]),
    ("passes", ["passes"]),
    ("backend", ["backend"]),
    ("api", ["api", "prune", "__init__"]),
    ("tools", ["bench", "demo"]),
]
_RANK = {part: (i, name) for i, (name, parts) in enumerate(LAYERS) for part in parts}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in _RANK:
        raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py LAYERS "
                             "(and to docs/architecture.md)")
    return _RANK[key]


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _targets(module: str, node: ast.AST) -> list[str]:
    """The project modules an import statement makes Python run: the module named, each imported
    name that is a module itself, and the packages above them; not the top package (the face, which
    every import runs), nor a package the importer is inside (it runs before the importer)."""
    named: list[str] = []
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = _package_of(module)
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        named = [base] + [f"{base}.{a.name}" for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module is None and named[0] == PACKAGE:
        named = named[1:]  # `from .. import x`: x, not the package's face
    inside = {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")) + 1)}
    out = []
    for name in named:
        if not name.startswith(PACKAGE + ".") and not (name == PACKAGE and isinstance(node, ast.Import)):
            continue
        if name not in MODULES:
            continue  # an imported name that is not a module (a function, a class)
        parts = name.split(".")
        out += [".".join(parts[:i]) for i in range(2, len(parts))]  # the packages it runs first
        out.append(name)
    return [t for t in dict.fromkeys(out) if t not in inside]


def _says_why(lines: list[str], node: ast.AST) -> bool:
    """A comment on the import's lines, or on the line above the run of import lines it is in."""
    if any("#" in lines[i] for i in range(node.lineno - 1, node.end_lineno)):
        return True
    first = node.lineno - 1
    indent = len(lines[first]) - len(lines[first].lstrip())
    while first > 0 and lines[first - 1].lstrip().startswith(("import ", "from ")) and \
            len(lines[first - 1]) - len(lines[first - 1].lstrip()) == indent:
        first -= 1
    return first > 0 and lines[first - 1].lstrip().startswith("#")


def _imports() -> list[tuple[str, str, int, bool, bool]]:
    """(importer, imported, line, inside a function, the statement carries a comment) for every
    project import of the package."""
    rows = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            said = _says_why(lines, node)
            for target in _targets(module, node):
                if target != module:
                    rows.append((module, target, node.lineno, id(node) in in_function, said))
            if id(node) in in_function and not _targets(module, node):
                rows.append((module, None, node.lineno, True, said))  # a function-level import of another package
    return rows


IMPORTS = _imports()


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_runs_up_the_layers():
    upward = []
    for importer, imported, line, _, _ in IMPORTS:
        if imported is None:
            continue
        (a, name_a), (b, name_b) = _layer(importer), _layer(imported)
        if b > a:
            upward.append(f"{_where(importer, line)} imports {imported} ({name_b}, above {name_a})")
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_no_circle_of_imports():
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for importer, imported, line, _, _ in IMPORTS:
        if imported is not None:
            graph[importer].setdefault(imported, line)
    # Tarjan's strongly connected components
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    said = []
    for comp in circles:
        edges = [f"  {_where(a, line)} imports {b}" for a in comp for b, line in graph[a].items() if b in comp]
        said.append(f"circle of {len(comp)} modules: {', '.join(comp)}\n" + "\n".join(edges))
    assert not circles, "\n".join(said)


def test_function_level_imports_say_why():
    silent = sorted({_where(m, line) + (f" ({t})" if t else "") for m, t, line, inside, why in IMPORTS
                     if inside and not why})
    assert not silent, ("an import inside a function needs a comment saying why it is deferred (an optional "
                        "or costly dependency), on its line or the line above:\n" + "\n".join(silent))


def test_the_checks_see_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    """The checks themselves: a lowering module importing a pass inside a function is seen, with
    the package it runs first, as an import into a higher layer."""
    source = "def f():\n    from ..passes import graph  # (here: to be seen)\n"
    path = tmp_path / "sparse_inductor" / "lowering" / "upward.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    monkeypatch.setitem(MODULES, "sparse_inductor.lowering.upward", path)
    node = ast.parse(source).body[0].body[0]
    assert _targets("sparse_inductor.lowering.upward", node) == ["sparse_inductor.passes", "sparse_inductor.passes.graph"]
    assert _layer("sparse_inductor.passes.graph") > _layer("sparse_inductor.lowering.upward")
