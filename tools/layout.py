"""The package's layout, measured from its source (issue 21): the module tree with line counts, the
import graph's circles, imports that run back up a layer, and underscore names used across modules.

    python tools/layout.py            # the report for ./edtool
    python tools/layout.py PATH/TO/PKG

Only the source is read (with `ast`), nothing is imported. An import inside a function body is
"function-level" (it runs when called); every other import runs when the module is loaded and is
"module-level". Only module-level imports can make a circle that breaks loading, so circles are
counted on those; function-level ones are reported beside them.
"""

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Layers, lowest first: a module may import its own layer and those below. The first matching
# prefix of the dotted name (without the package) decides; anything unlisted is a utility (layer 0).
LAYERS = (
    ("utilities", ()),  # errors, paths, fileio, config, diffusion, data, imageio, the package itself
    ("parts", ("jacobian", "els", "networks", "store")),
    ("study", ("study",)),
    ("cli", ("cli", "cli_networks", "cli_options", "console", "__main__")),
)


@dataclass(frozen=True)
class Import:
    """One edtool module importing another: what, where, and whether it runs at load time."""

    source: str
    target: str
    line: int
    module_level: bool
    names: tuple = ()  # the names taken (`from target import a, b`), empty for `import target`


@dataclass
class Module:
    name: str  # dotted, e.g. edtool.store.run
    path: Path
    lines: int
    is_package: bool
    imports: list = field(default_factory=list)
    private_uses: list = field(default_factory=list)  # (line, "target._name") across modules


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    """A single-underscore name (`_helper`); dunders such as __version__ are public."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer(name: str, package: str) -> int:
    rest = name[len(package) + 1:] if name.startswith(package + ".") else ""
    top = rest.split(".", 1)[0]
    for i, (_, prefixes) in enumerate(LAYERS):
        if top in prefixes:
            return i
    return 0


class _Visitor(ast.NodeVisitor):
    """Collects a module's imports of the package (module- or function-level) and the names each
    local name stands for, then its attribute uses of underscore names of other modules."""

    def __init__(self, module: Module, known: set):
        self.module, self.known, self.depth = module, known, 0
        self.aliases = {}  # local name -> edtool module it is bound to

    def resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.module.name.split(".")
        base = base if self.module.is_package else base[:-1]
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def add(self, target: str, line: int, names=()):
        if target != self.module.name:
            self.module.imports.append(Import(self.module.name, target, line, self.depth == 0, tuple(names)))

    def visit_Import(self, node):
        for alias in node.names:
            target = alias.name
            while target and target not in self.known:
                target = target.rpartition(".")[0]
            if target:
                self.add(target, node.lineno)
                if alias.asname:
                    self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node):
        base = self.resolve(node)
        if base not in self.known:
            return
        plain = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.known:  # `from edtool.store import run`: the submodule itself
                self.add(sub, node.lineno)
                self.aliases[alias.asname or alias.name] = sub
            else:
                plain.append(alias.name)
                if is_private(alias.name) and base != self.module.name:
                    self.module.private_uses.append((node.lineno, f"{base}.{alias.name}"))
        if plain or not node.names:
            self.add(base, node.lineno, plain)

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):  # `if TYPE_CHECKING:` imports never run
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and is_private(node.attr):
            target = self.aliases[node.value.id]
            if target != self.module.name:
                self.module.private_uses.append((node.lineno, f"{target}.{node.attr}"))
        self.generic_visit(node)


def scan(root) -> dict:
    """{dotted name: Module} for every .py file under the package directory `root`."""
    root = Path(root).resolve()
    paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {}
    for path in paths:
        name = module_name(root, path)
        modules[name] = Module(name, path, len(path.read_text().splitlines()), path.name == "__init__.py")
    for module in modules.values():
        _Visitor(module, set(modules)).visit(ast.parse(module.path.read_text(), str(module.path)))
    return modules


def edges(modules: dict, module_level_only: bool = True) -> dict:
    """{source: set of targets} of the package's imports (each pair once)."""
    out = {name: set() for name in modules}
    for module in modules.values():
        for imp in module.imports:
            if imp.module_level or not module_level_only:
                out[module.name].add(imp.target)
    return out


def circles(graph: dict) -> list:
    """The import graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward(modules: dict, package: str) -> list:
    """Imports from a lower layer into a higher one (`Import`s, in file order)."""
    return [imp for m in modules.values() for imp in m.imports
            if layer(imp.source, package) < layer(imp.target, package)]


def private_uses(modules: dict) -> list:
    """(module, line, "target._name") for each underscore name a module takes from another."""
    return [(m.name, line, what) for m in modules.values() for line, what in m.private_uses]


def report(root) -> str:
    root = Path(root).resolve()
    package = root.name
    modules = scan(root)
    out = [f"module tree of {package} (lines; * over 500)"]
    for name in sorted(modules, key=lambda n: (modules[n].path.parent.parts, not modules[n].is_package, n)):
        m = modules[name]
        depth = name.count(".")
        label = (name.rsplit(".", 1)[-1] + "/") if m.is_package else m.path.name
        out.append(f"  {'  ' * depth}{label:<{34 - 2 * depth}} {m.lines:>5}{' *' if m.lines > 500 else ''}")
    total = sum(m.lines for m in modules.values())
    big = sorted((m.lines, n) for n, m in modules.items() if m.lines > 500)
    out.append(f"  {len(modules)} modules, {total} lines; over 500: "
               + (", ".join(f"{n} ({k})" for k, n in reversed(big)) or "none"))

    for title, only in (("module-level", True), ("any (function-level included)", False)):
        found = circles(edges(modules, only))
        out.append(f"\nimport circles, {title} imports: {len(found)}")
        out.extend(f"  {' <-> '.join(c)}" for c in found)

    names = [f"{i}={n} ({', '.join(p) or 'the rest'})" for i, (n, p) in enumerate(LAYERS)]
    ups = upward(modules, package)
    out.append(f"\nupward imports (layers {'; '.join(names)}): "
               f"{sum(i.module_level for i in ups)} module-level, {sum(not i.module_level for i in ups)} function-level")
    out.extend(f"  {i.source}:{i.line} -> {i.target} ({'module' if i.module_level else 'function'}-level"
               f"{': ' + ', '.join(i.names) if i.names else ''})" for i in ups)

    sideways = {}
    for m in modules.values():
        for imp in m.imports:
            a, b = (imp.source.split(".")[1:2], imp.target.split(".")[1:2])
            if a != b and layer(imp.source, package) == layer(imp.target, package) == 1:
                sideways.setdefault((a[0], b[0]), set()).add(imp.source.split(".", 1)[1])
    out.append(f"\nbetween subpackages of layer 1 (importer -> imported: importing modules): {len(sideways)}")
    out.extend(f"  {a} -> {b}: {', '.join(sorted(s))}" for (a, b), s in sorted(sideways.items()))

    private = private_uses(modules)
    out.append(f"\nunderscore names taken from another module: {len(private)}")
    out.extend(f"  {name}:{line} uses {what}" for name, line, what in private)
    return "\n".join(out)


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "edtool"
    print(report(sys.argv[1] if len(sys.argv) > 1 else default))
