"""Static checks of a child's source, run before any of its code does: a quick, friendly first filter.

They are not the security boundary (Python is not a sandbox: the OS isolates the child and the
judge scores it from outside, see plasa_lab.judge); they turn the common mistakes and the obvious
attempts into one line that names the rule, the place and the fix, before anything is paid for.
The rules are allow-lists where that is possible, each closing a whole way in rather than one
trick: imports and the modules reachable through their attributes; attribute assignment only as
`self.<name> = ...` inside `__init__`, where `self` is the object being made (never a class or a
module a method was handed); classes that are modules (nn.Module) or plain, with no decorators but
harmless ones and no dunder but `__init__`. Then a short deny-list of capabilities a model never
needs (files, processes, network, introspection of frames and code). Behaviour (causality,
selection, budgets) is checked at run time by the judge.
"""

import ast
import importlib
import types

from .program import BlockError, split_blocks

ALLOWED_IMPORTS = {"math", "torch", "torch.nn", "torch.nn.functional"}
# Modules a block may reach as `module.attribute` chains (torch.sys, F.torch.os, nn.modules: no).
REACHABLE_MODULES = ALLOWED_IMPORTS | {"torch.nn.init", "torch.linalg", "torch.special", "torch.fft"}
ALLOWED_DECORATORS = {"property", "torch.no_grad()", "torch.no_grad", "torch.inference_mode()"}
FORBIDDEN_NAMES = {
    # code loading and introspection
    "exec",
    "eval",
    "compile",
    "__import__",
    "globals",
    "locals",
    "vars",
    "getattr",
    "setattr",
    "delattr",
    "breakpoint",
    "help",
    "input",
    "memoryview",
    "__builtins__",
    "__loader__",
    "__spec__",
    # what makes `self` something other than the new object (a class, a module), or builds classes
    "type",
    "staticmethod",
    "classmethod",
    # files, processes, network, the interpreter
    "open",
    "exit",
    "quit",
    "os",
    "sys",
    "subprocess",
    "socket",
    "importlib",
    "ctypes",
    "pickle",
    "marshal",
    "shutil",
    "pathlib",
    "io",
    "inspect",
    "gc",
    "builtins",
    "threading",
    "multiprocessing",
    "signal",
    "resource",
    "urllib",
    "http",
    "requests",
}
# Attributes that read or write files, load code, spawn work, or change process-wide state.
FORBIDDEN_ATTRIBUTES = {
    "load",
    "save",
    "from_file",
    "fromfile",
    "tofile",
    "hub",
    "ops",
    "classes",
    "library",
    "load_library",
    "cpp_extension",
    "utils",
    "multiprocessing",
    "distributed",
    "package",
    "jit",
    "compile",
    "set_num_threads",
    "set_num_interop_threads",
    "manual_seed",
    "seed",
    "set_rng_state",
    "set_default_dtype",
    "set_default_device",
    "set_default_tensor_type",
    "use_deterministic_algorithms",
    "set_flush_denormal",
    "backends",
    "environ",
    "system",
    "popen",
    "profiler",
    "export_chrome_trace",
    "export_stacks",
    "export_memory_timeline",
    "register_module_forward_hook",
    "register_module_forward_pre_hook",
    "register_module_full_backward_hook",
    "register_module_backward_hook",
    "register_module_buffer_registration_hook",
    "register_module_parameter_registration_hook",
    "register_module_module_registration_hook",
}
# Frames, generators, coroutines, tracebacks and code objects: the way from a value back to the
# interpreter (a caller's frame, its globals, its builtins). No model reads them.
INTROSPECTION_PREFIXES = ("f_", "gi_", "cr_", "ag_", "co_", "tb_")


def syntax_violation(text: str):
    try:
        ast.parse(text)
    except SyntaxError as e:
        return f"syntax error at line {e.lineno}: {e.msg}: fix the Python syntax"
    return None


def _fixed_lines(text: str):
    """(line number, text) of every line outside the block bodies, trailing whitespace and
    trailing blank lines ignored (harmless formatting an LLM diff may change)."""
    inside = {i for b in split_blocks(text)[1] for i in range(b.start + 1, b.end)}
    lines = [(i + 1, line.rstrip()) for i, line in enumerate(text.splitlines()) if i not in inside]
    while lines and not lines[-1][1]:
        lines.pop()
    return lines


def integrity_violation(text: str, reference: str):
    """The text outside the EVOLVE-BLOCKs (markers included) equals the reference's."""
    try:
        blocks = split_blocks(text)[1]
    except BlockError as e:
        return f"EVOLVE-BLOCK markers broken: {e}: keep every START/END marker as it is"
    n_ref = len(split_blocks(reference)[1])
    if len(blocks) != n_ref:
        return (
            f"the program has {len(blocks)} EVOLVE-BLOCKs, the initial program {n_ref}: "
            f"keep every block and its markers"
        )
    child, ref = _fixed_lines(text), _fixed_lines(reference)
    for (line_no, got), (_, want) in zip(child, ref):
        if got != want:
            return (
                f"line {line_no}: text outside the EVOLVE-BLOCKs changed ({got.strip()[:60]!r}, was "
                f"{want.strip()[:60]!r}): edit only inside the blocks"
            )
    if len(child) != len(ref):
        where = child[len(ref)][0] if len(child) > len(ref) else (child[-1][0] if child else 1)
        return f"line {where}: lines added or removed outside the EVOLVE-BLOCKs: edit only inside the blocks"
    return None


def _root_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _top_level_bindings(statements):
    """name -> module path (for imports) or None (anything else) bound by module-level statements."""
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
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    bound[sub.id] = None
    return bound


def _node_violation(node, in_init: set[int]):
    """The rule a single node inside a block breaks, if any (`in_init`: ids of the nodes inside a
    block class's __init__)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        if isinstance(node, ast.ImportFrom) and node.level:
            return "relative imports are not allowed"
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        for module in modules:
            if module not in ALLOWED_IMPORTS:
                return f"import of {module!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_IMPORTS))})"
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*" or alias.name.startswith("_") or alias.name in FORBIDDEN_ATTRIBUTES:
                    return f"importing {alias.name!r} from {node.module} is not allowed"
    elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
        return f"{node.id!r} is not allowed in an EVOLVE-BLOCK (no files, processes, network or introspection)"
    elif isinstance(node, ast.Attribute):
        is_super_init = (
            node.attr == "__init__"
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "super"
        )
        if node.attr.startswith("__") and not is_super_init:
            return f"dunder attribute {node.attr!r} is not allowed (super().__init__ is the one exception)"
        if node.attr.startswith("_") and not is_super_init and _root_name(node) != "self":
            return f"private attribute {node.attr!r} is not allowed (only self._name)"
        if node.attr in FORBIDDEN_ATTRIBUTES:
            return f"attribute {node.attr!r} is not allowed (no file I/O, code loading or process-wide settings)"
        if node.attr.startswith(INTROSPECTION_PREFIXES):
            return f"attribute {node.attr!r} is not allowed (no frames, generators, tracebacks or code objects)"
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
        return "global/nonlocal statements are not allowed"
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete, ast.For, ast.With)):
        targets = (
            node.targets
            if isinstance(node, (ast.Assign, ast.Delete))
            else [i.optional_vars for i in node.items if i.optional_vars]
            if isinstance(node, ast.With)
            else [node.target]
        )
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                    if not (isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                        return (
                            f"assignment to {ast.unparse(sub)!r}: only self.<name> = ... may be assigned; "
                            f"change parameters in place (nn.init.*, p.copy_(...))"
                        )
                    if id(node) not in in_init:
                        return (
                            f"assignment to {ast.unparse(sub)!r} outside __init__: self.<name> = ... only in "
                            f"__init__, where self is the object being made; make what forward needs there"
                        )
    return None


def _inside_init(statements) -> set[int]:
    """ids of every node inside the body of a class's `__init__`: where `self` is the new object."""
    inside = set()
    for node in ast.walk(ast.Module(body=statements, type_ignores=[])):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    inside.update(id(sub) for statement in item.body for sub in ast.walk(statement))
    return inside


def _import_target(path: str):
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


def _attribute_chain(node):
    """[root, attr, attr, ...] of a pure `name.attr.attr` expression, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


def _reached(chain, modules):
    """The objects a `module.attr.attr` chain passes through (after its root module), while known."""
    obj = modules.get(chain[0])
    found = []
    for name in chain[1:]:
        if obj is None or name.startswith("_"):
            break
        obj = getattr(obj, name, None)
        found.append(obj)
    return found


def _structure_violation(node, parents, modules, program_classes):
    """Rules about what the block builds: reachable modules, classes, decorators, dunders."""
    if isinstance(node, ast.Attribute):
        chain = _attribute_chain(node)
        if chain and chain[0] in modules:
            for obj in _reached(chain, modules):
                if isinstance(obj, types.ModuleType) and obj.__name__ not in REACHABLE_MODULES:
                    return (
                        f"{ast.unparse(node)!r} reaches the module {obj.__name__}: blocks may use "
                        f"{', '.join(sorted(REACHABLE_MODULES))}"
                    )
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in modules:
        parent = parents.get(id(node))
        if not (isinstance(parent, ast.Attribute) and parent.value is node):
            return f"the module {node.id!r} used as a value: use it only as {node.id}.<name>"
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith("__"):
        return f"binding the name {node.id!r}: a block defines no dunder but __init__"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if node.name.startswith("__") and node.name != "__init__":
            return f"defining {node.name!r}: a block defines no dunder but __init__"
        for decorator in node.decorator_list:
            if ast.unparse(decorator) not in ALLOWED_DECORATORS or node.name == "__init__":
                return (
                    f"the decorator @{ast.unparse(decorator)} is not allowed (allowed: "
                    f"{', '.join(sorted(ALLOWED_DECORATORS))}, and none on __init__)"
                )
    if isinstance(node, ast.ClassDef):
        if node.keywords:
            return f"class {node.name} takes keywords (a metaclass): a block's classes are plain or nn.Module"
        import torch.nn

        for base in node.bases:
            chain = _attribute_chain(base)
            if chain and len(chain) == 1 and chain[0] in program_classes | {"object"}:
                continue
            reached = _reached(chain, modules) if chain and chain[0] in modules else []
            if not (reached and isinstance(reached[-1], type) and issubclass(reached[-1], torch.nn.Module)):
                return (
                    f"class {node.name} derives from {ast.unparse(base)}: a block's classes derive from "
                    f"nn.Module (or a class of the program), or from nothing"
                )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super" and node.args:
        args = node.args
        if not (len(args) == 2 and isinstance(args[0], ast.Name) and isinstance(args[1], ast.Name)) or (
            args[1].id != "self"
        ):
            return "super() takes no arguments here, or (TheClass, self)"
    return None


def _method_selves(statements) -> set[int]:
    """ids of the `self` parameter nodes that are the first parameter of a function defined
    directly in a class body: the only `self` a block may bind."""
    selves = set()
    for node in ast.walk(ast.Module(body=statements, type_ignores=[])):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    params = item.args.posonlyargs + item.args.args
                    if params and params[0].arg == "self":
                        selves.add(id(params[0]))
    return selves


def _self_violation(node, selves):
    """`self` may only be a method's first parameter (so `self.x = ...` always means the object)."""
    if isinstance(node, ast.arg) and node.arg == "self" and id(node) not in selves:
        return "a parameter named 'self' that is not the first parameter of a method"
    if isinstance(node, ast.Name) and node.id == "self" and isinstance(node.ctx, (ast.Store, ast.Del)):
        return "assignment to the name 'self'"
    if isinstance(node, ast.alias) and (node.asname or node.name) == "self":
        return "importing as 'self'"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == "self":
        return "a function or class named 'self'"
    return None


def _annotation_violation(node):
    """Annotations may name types but never hold strings: some library code evaluates string
    annotations, which would run them as code."""
    annotations = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args
        params = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
        annotations = [p.annotation for p in params if p.annotation] + (
            [node.returns] if getattr(node, "returns", None) else []
        )
    elif isinstance(node, ast.AnnAssign):
        annotations = [node.annotation]
    for annotation in annotations:
        if any(isinstance(sub, ast.Constant) and isinstance(sub.value, str) for sub in ast.walk(annotation)):
            return "string annotations are not allowed (write the type itself, or leave the annotation out)"
    return None


def block_code_violation(text: str, reference: str):
    """Every statement inside the blocks keeps to the allow-lists and binds no fixed name."""
    tree = ast.parse(text)
    inside = {i + 1 for b in split_blocks(text)[1] for i in range(b.start + 1, b.end)}
    outside_statements = [n for n in tree.body if n.lineno not in inside]
    block_statements = [n for n in tree.body if n.lineno in inside]
    fixed = _top_level_bindings(outside_statements)
    selves = _method_selves(block_statements)
    in_init = _inside_init(block_statements)
    imports = {**fixed, **_top_level_bindings(block_statements)}
    modules = {}
    for name, path in imports.items():
        if path is not None and isinstance(target := _import_target(path), types.ModuleType):
            modules[name] = target
    program_classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    block_tree = ast.Module(body=block_statements, type_ignores=[])
    parents = {id(child): node for node in ast.walk(block_tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(block_tree):
        rule = _self_violation(node, selves) or _annotation_violation(node)
        if rule and hasattr(node, "lineno"):
            return f"line {node.lineno}: {rule}"
        if not hasattr(node, "lineno"):
            continue
        rule = _node_violation(node, in_init) or _structure_violation(node, parents, modules, program_classes)
        if rule is None and isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                root = _root_name(target)
                if isinstance(target, ast.Subscript) and root in fixed:
                    rule = f"assignment into {root!r}, defined outside the blocks: leave the fixed code's values alone"
        if rule:
            return f"line {node.lineno}: {rule}"
    for name, module in _top_level_bindings(block_statements).items():
        if name in fixed and not (module is not None and fixed[name] == module):
            line = next(n.lineno for n in block_statements if name in _top_level_bindings([n]))
            return f"line {line}: the block redefines {name!r}, which the fixed code defines: give it a new name"
    return None


def static_violation(text: str, reference: str):
    """All static checks in order: syntax, block integrity, block code."""
    return syntax_violation(text) or integrity_violation(text, reference) or block_code_violation(text, reference)
