"""Static checks of a child's source, run before any of its code does: a quick, friendly first filter.

They are not the security boundary (Python is not a sandbox: the OS isolates the child and the
judge scores it from outside, see plasa_lab.judge); they turn the common mistakes and the obvious
attempts into one line that names the rule, the place and the fix, before anything is paid for.
The rules are allow-lists where that is possible (imports; attribute assignment only as
`self.<name> = ...` where `self` is a method's first parameter) and a short deny-list of
capabilities a model never needs (files, processes, network, introspection of frames and code).
Behaviour (causality, selection, budgets) is checked at run time by the judge.
"""

import ast

from .program import BlockError, split_blocks

ALLOWED_IMPORTS = {"math", "torch", "torch.nn", "torch.nn.functional"}
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


def _node_violation(node):
    """The rule a single node inside a block breaks, if any."""
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
    for node in ast.walk(ast.Module(body=block_statements, type_ignores=[])):
        rule = _self_violation(node, selves) or _annotation_violation(node)
        if rule and hasattr(node, "lineno"):
            return f"line {node.lineno}: {rule}"
        if not hasattr(node, "lineno"):
            continue
        rule = _node_violation(node)
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
