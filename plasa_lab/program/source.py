"""A program as the static checks read it (plasa_lab.program.checks): its block statements, the names its
fixed code binds, the modules its names stand for, the attributes it defines. Facts only; the
rules that judge them are in checks.py."""

import ast
import importlib
import types
from functools import cached_property

from .allowlists import ALLOWED_IMPORTS, REGISTERS
from .blocks import split_blocks


def root_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def attribute_chain(node):
    """[root, attr, attr, ...] of a pure `name.attr.attr` expression, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


def reached(chain, modules):
    """The objects a `module.attr.attr` chain passes through (after its root module), while known."""
    obj = modules.get(chain[0])
    found = []
    for name in chain[1:]:
        if obj is None or name.startswith("_"):
            break
        obj = getattr(obj, name, None)
        found.append(obj)
    return found


def top_level_bindings(statements):
    """name -> module path (for imports) or None (anything else) bound (or deleted) by module-level statements."""
    bound = {}
    for node in statements:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound[node.name] = None
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):  # del unbinds
                    bound[sub.id] = None
    return bound


def import_target(path: str):
    """The object an import path names (a module or an attribute of one), for the allowed imports
    only (nothing else is imported here); None otherwise."""
    module, _, name = path.rpartition(".")
    for candidate, attribute in ((path, None), (module, name)):
        if candidate in ALLOWED_IMPORTS:
            try:
                found = importlib.import_module(candidate)
            except ImportError:
                return None
            return getattr(found, attribute, None) if attribute else found
    return None


def first_line(statement) -> int:
    """Where a statement begins: its decorators are part of it."""
    return min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])


class Source:
    """A program and the reference it is checked against. Each fact is computed when a rule first
    asks for it (the rules before the syntax rule read only the text)."""

    def __init__(self, text: str, reference: str):
        self.text, self.reference = text, reference

    @cached_property
    def tree(self):
        return ast.parse(self.text)

    @cached_property
    def block_lines(self) -> list[range]:
        """1-based line numbers strictly inside each block, as Python numbers lines."""
        return [range(b.start + 2, b.end + 1) for b in split_blocks(self.text)[1]]

    @cached_property
    def block_statements(self):
        inside = {line for lines in self.block_lines for line in lines}
        return [n for n in self.tree.body if first_line(n) in inside]

    @cached_property
    def fixed(self) -> dict:
        """name -> import path or None: the names the text outside the blocks binds."""
        block = {id(n) for n in self.block_statements}
        return top_level_bindings([n for n in self.tree.body if id(n) not in block])

    @cached_property
    def modules(self) -> dict:
        """name -> module, for every name the program binds to a module by an import."""
        imports = {**self.fixed, **top_level_bindings(self.block_statements)}
        found = {}
        for name, path in imports.items():
            if path is not None and isinstance(target := import_target(path), types.ModuleType):
                found[name] = target
        return found

    @cached_property
    def block_nodes(self):
        """Every node of the block code that has a line, in ast.walk's order (outermost first)."""
        tree = ast.Module(body=self.block_statements, type_ignores=[])
        return [n for n in ast.walk(tree) if hasattr(n, "lineno")]

    @cached_property
    def parents(self) -> dict:
        tree = ast.Module(body=self.block_statements, type_ignores=[])
        return {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    @cached_property
    def in_init(self) -> set[int]:
        """ids of every node inside the body of a block class's `__init__`: where `self` is the new object."""
        inside = set()
        for node in self.block_nodes:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        inside.update(id(sub) for statement in item.body for sub in ast.walk(statement))
        return inside

    @cached_property
    def method_selves(self) -> set[int]:
        """ids of the `self` parameters that are the first parameter of a method of a block class."""
        selves = set()
        for node in self.block_nodes:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    is_method = isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    params = item.args.posonlyargs + item.args.args if is_method else []
                    if params and params[0].arg == "self":
                        selves.add(id(params[0]))
        return selves

    @cached_property
    def classes(self) -> set[str]:
        return {n.name for n in self.tree.body if isinstance(n, ast.ClassDef)}

    @cached_property
    def own_attributes(self) -> set[str]:
        """Attribute names the program defines itself (fixed code and blocks): every self.<name> it
        assigns, every function and class, every buffer or parameter it registers by name."""
        names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REGISTERS:
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    names.add(node.args[0].value)
        return {name for name in names if not name.startswith("__")}

    def known_object(self, node):
        """The object a `module.attr...` expression names (a module, a class, a function), or None."""
        chain = attribute_chain(node)
        if not chain or chain[0] not in self.modules:
            return None
        found = [self.modules[chain[0]], *reached(chain, self.modules)]
        return found[-1] if len(found) == len(chain) else None
