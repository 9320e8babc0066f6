"""Static checks of a child's source, run before any of its code does: a quick, friendly first filter.

They are not the security boundary (Python is not a sandbox: the OS isolates the child and the
judge scores it from outside, see plasa_lab.evaluation.judge); they turn the common mistakes and the obvious
attempts into one line that names the place, the rule and the fix, before anything is paid for.

`RULES` is the pipeline: the rules below, in the order of this file, which is the order they run
in. Each has a name, what it allows (the LLM's system message lists the same lines, see
plasa_lab.program.prompting) and, in its docstring, what it closes. First the whole text (its size, its
line ends, that it parses, that only the blocks changed), then the block code, by allow-lists
(plasa_lab.program.allowlists) wherever that is possible: the modules it imports and reaches, the builtins
it names, the attributes it uses; attributes assigned only as `self.<name> = ...` inside
`__init__`; classes that are modules or plain. Behaviour (causality, selection, budgets) is
checked at run time by the judge.
"""

import ast
import builtins
import types
import warnings
from dataclasses import dataclass
from typing import Callable

from .allowlists import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_BUILTINS,
    ALLOWED_DECORATORS,
    ALLOWED_IMPORTS,
    ANY_ATTRIBUTE_MODULES,
    ATTRIBUTE_FIXES,
    MAX_PROGRAM_CHARS,
    NOT_LINE_ENDS,
    REACHABLE_MODULES,
    dtype_names,
    module_attribute_names,
    module_machinery,
    reserved_attributes,
)
from .blocks import BlockError, program_lines, split_blocks
from .source import Source, attribute_chain, first_line, import_target, reached, root_name, top_level_bindings

__all__ = ["ALLOWED_IMPORTS", "RULES", "Violation", "find_violation", "integrity_violation", "static_violation"]


@dataclass(frozen=True)
class Violation:
    rule: str  # the name of the rule broken
    line: int | None  # where, when it is one place
    message: str  # the whole one line: "line N: <rule>: <what, and the fix>"

    def __str__(self):
        return self.message


@dataclass(frozen=True)
class Rule:
    name: str
    allows: str  # what it allows, as the LLM's system message says it
    closes: str  # the ways in it closes (its check's docstring)
    check: Callable  # Source -> (line or None, text) or None


RULES: list[Rule] = []


def rule(name: str, allows: str, per_node: bool = False):
    """Append the check below to RULES. `per_node`: it judges one block node at a time, and the first
    node it objects to is the violation."""

    def add(check):
        def each_block_node(source):
            for node in source.block_nodes:
                if text := check(node, source):
                    return node.lineno, text
            return None

        RULES.append(Rule(name, allows, " ".join(check.__doc__.split()), each_block_node if per_node else check))
        return check

    return add


# ---------------------------------------------------------------------------------------------
# The whole text: its size, its lines, its syntax, and that only the blocks changed


@rule("program-size", f"the whole program has at most {MAX_PROGRAM_CHARS:,} characters")
def _program_size(source):
    """Programs too big to read cheaply: megabytes of code that would fail later, on the wire, with a
    misleading error."""
    if len(source.text) > MAX_PROGRAM_CHARS:
        return None, (
            f"the program has {len(source.text):,} characters, over the limit of {MAX_PROGRAM_CHARS:,}: "
            f"make it shorter (the initial program has {len(source.reference):,})"
        )
    return None


@rule(
    "line-ends", "lines end with \\n; no other line or page separator (\\f, \\v, \\x1c-\\x1e, \\x85, \\u2028, \\u2029)"
)
def _line_ends(source):
    """Statements hidden between two ways of counting lines: str.splitlines ends a line at \\x1c (in a
    comment, say), Python does not."""
    for number, line in enumerate(program_lines(source.text), 1):
        if found := next((c for c in line if c in NOT_LINE_ENDS), None):
            return number, (
                f"the character {found!r} (U+{ord(found):04X}), which Python does not take for a line end "
                f"(other tools do): end lines with \\n only and write no such character anywhere"
            )
    return None


@rule("syntax", "the program parses as Python")
def _syntax(source):
    """Programs Python cannot parse or compile (return outside a function, say), and every way its
    parser fails (recursion, memory, NUL characters)."""
    try:
        with warnings.catch_warnings():  # the child's SyntaxWarnings are no line of the evaluator's stderr
            warnings.simplefilter("ignore")
            compile(source.tree, "<program>", "exec", dont_inherit=True)  # compiled, never run
    except SyntaxError as e:
        return e.lineno, f"syntax error{f' at line {e.lineno}' if e.lineno else ''}: {e.msg}: fix the Python syntax"
    except (RecursionError, MemoryError) as e:
        gave_up = f"Python's parser or compiler gave up ({type(e).__name__})"
        return None, f"syntax error: {gave_up}: nest expressions less deeply"
    except ValueError as e:  # NUL characters (before Python 3.12), lone surrogates
        return None, f"syntax error: {str(e).splitlines()[0] if str(e) else type(e).__name__}: fix the characters"
    return None


@rule("evolve-block-markers", "every EVOLVE-BLOCK-START/END marker stays as it is")
def _block_markers(source):
    """Blocks added, removed, nested or left open."""
    try:
        blocks = split_blocks(source.text)[1]
    except BlockError as e:
        return None, f"EVOLVE-BLOCK markers broken: {e}: keep every START/END marker as it is"
    n_ref = len(split_blocks(source.reference)[1])
    if len(blocks) != n_ref:
        return None, f"the program has {len(blocks)} EVOLVE-BLOCKs, the initial program {n_ref}: keep them all"
    return None


def _fixed_lines(text: str):
    """(line number, text) of every line outside the block bodies, trailing whitespace and
    trailing blank lines ignored (harmless formatting an LLM diff may change)."""
    inside = {i for b in split_blocks(text)[1] for i in range(b.start + 1, b.end)}
    lines = [(i + 1, line.rstrip()) for i, line in enumerate(program_lines(text)) if i not in inside]
    while lines and not lines[-1][1]:
        lines.pop()
    return lines


@rule("fixed-code", "the text outside the blocks stays as it is")
def _fixed_code(source):
    """Edits of the fixed model, its training run or its configuration."""
    child, ref = _fixed_lines(source.text), _fixed_lines(source.reference)
    for (line_no, got), (_, want) in zip(child, ref):
        if got != want:
            return line_no, (
                f"text outside the EVOLVE-BLOCKs changed ({got.strip()[:60]!r}, was {want.strip()[:60]!r}): "
                f"edit only inside the blocks"
            )
    if len(child) != len(ref):
        where = child[len(ref)][0] if len(child) > len(ref) else (child[-1][0] if child else 1)
        return where, "lines added or removed outside the EVOLVE-BLOCKs: edit only inside the blocks"
    return None


@rule("block-statements", "every statement of a block starts and ends inside that block")
def _block_statements(source):
    """Block code running on into the fixed code, unchecked: a string or a bracket left open through a
    marker, a decorator on a block's last line that decorates the fixed class after it."""
    for statement in source.tree.body:
        start, end = first_line(statement), statement.end_lineno
        for lines in source.block_lines:
            if start < lines.stop and lines.start <= end and not (start in lines and end in lines):
                return start, (
                    f"a statement from line {start} to line {end} crosses an EVOLVE-BLOCK marker: "
                    f"end every statement inside the block it starts in"
                )
    return None


# ---------------------------------------------------------------------------------------------
# The block code: what it imports, assigns and binds

_IMPORTS = ", ".join(sorted(ALLOWED_IMPORTS)[:-1]) + " and " + sorted(ALLOWED_IMPORTS)[-1]


@rule("imports", f"may import only {_IMPORTS}; from-imports only of names on the attribute list", per_node=True)
def _imports(node, source):
    """Files, processes, the network, the interpreter: every module but the few a model needs."""
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
        return None
    if isinstance(node, ast.ImportFrom) and node.level:
        return "relative imports are not allowed"
    for module in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]:
        if module not in ALLOWED_IMPORTS:
            return f"import of {module!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_IMPORTS))})"
    for alias in node.names if isinstance(node, ast.ImportFrom) else []:
        target = import_target(f"{node.module}.{alias.name}")
        if isinstance(target, types.ModuleType):
            allowed = target.__name__ in REACHABLE_MODULES
        else:
            allowed = alias.name in ALLOWED_ATTRIBUTES or node.module in ANY_ATTRIBUTE_MODULES
        if alias.name == "*" or alias.name.startswith("_") or not allowed:
            return f"importing {alias.name!r} from {node.module} is not allowed (only names on the attribute list)"
    return None


@rule(
    "attribute-assignment",
    "may assign attributes only as self.<name> = ... inside __init__ (self its first parameter); change "
    "parameters in place (nn.init.*, p.copy_(...) under torch.no_grad())",
    per_node=True,
)
def _attribute_assignment(node, source):
    """Patching the fixed code, a library or a class (through a method handed it), by whatever binds an
    attribute: =, +=, del, for, with, a comprehension's target."""
    if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del))):
        return None
    if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
        return (
            f"assignment to {ast.unparse(node)!r}: only self.<name> = ... may be assigned; "
            f"change parameters in place (nn.init.*, p.copy_(...))"
        )
    if id(node) not in source.in_init:
        return (
            f"assignment to {ast.unparse(node)!r} outside __init__: self.<name> = ... only in "
            f"__init__, where self is the object being made; make what forward needs there"
        )
    return None


@rule(
    "fixed-names",
    "may define new names, but never assign into or redefine a name the fixed code defines (MODEL_CONFIG, "
    "FFN_HIDDEN, torch, nn, F, math, apply_rope, PLASAAttention, ...)",
)
def _fixed_names(source):
    """Changing the fixed code's values, or its functions and classes, from a block."""
    for node in source.block_nodes:
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and (root := root_name(target)) in source.fixed:
                    return node.lineno, (
                        f"assignment into {root!r}, defined outside the blocks: leave the fixed code's values alone"
                    )
    for statement in source.block_statements:
        for name, module in top_level_bindings([statement]).items():
            if name in source.fixed and not (module is not None and source.fixed[name] == module):
                return (
                    statement.lineno,
                    f"the block redefines {name!r}, which the fixed code defines: give it a new name",
                )
    return None


@rule("self-binding", "self is only ever a method's first parameter", per_node=True)
def _self_binding(node, source):
    """A `self` that is not the object being made, so that self.<name> = ... would patch something else."""
    if isinstance(node, ast.arg) and node.arg == "self" and id(node) not in source.method_selves:
        return "a parameter named 'self' that is not the first parameter of a method"
    if isinstance(node, ast.Name) and node.id == "self" and isinstance(node.ctx, (ast.Store, ast.Del)):
        return "assignment to the name 'self'"
    if isinstance(node, ast.alias) and (node.asname or node.name) == "self":
        return "importing as 'self'"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == "self":
        return "a function or class named 'self'"
    return None


@rule("string-annotations", "annotations name types, never strings", per_node=True)
def _string_annotations(node, source):
    """Code run by library code that evaluates string annotations."""
    annotations = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args
        params = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
        annotations = [p.annotation for p in params if p.annotation] + [getattr(node, "returns", None)]
    elif isinstance(node, ast.AnnAssign):
        annotations = [node.annotation]
    for annotation in filter(None, annotations):
        if any(isinstance(sub, ast.Constant) and isinstance(sub.value, str) for sub in ast.walk(annotation)):
            return "string annotations are not allowed (write the type itself, or leave the annotation out)"
    return None


@rule("global-nonlocal", "no global or nonlocal statements", per_node=True)
def _global_nonlocal(node, source):
    """Rebinding the program's globals (the fixed code's among them) from inside a function."""
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return "global/nonlocal statements are not allowed: return what a function computes"
    return None


@rule("builtin-allow-list", f"builtins only from: {', '.join(sorted(ALLOWED_BUILTINS))}; no dunder names", True)
def _builtin_names(node, source):
    """open, eval, exec, compile, getattr, globals, vars, type, __import__, __builtins__ and every other
    builtin a model does not need; dunder names (__class__, `__call__ = ...` in a class body)."""
    if not isinstance(node, ast.Name):
        return None
    if node.id.startswith("__"):
        what = "binding the name" if isinstance(node.ctx, (ast.Store, ast.Del)) else "the name"
        return f"{what} {node.id!r}: a block names no dunder (it defines only __init__, as a method)"
    if hasattr(builtins, node.id) and node.id not in ALLOWED_BUILTINS:
        return (
            f"the builtin {node.id!r} is not allowed (a block opens no files, loads no code, inspects no "
            f"objects): use the builtins the rules list, or another name"
        )
    return None


# ---------------------------------------------------------------------------------------------
# The block code: what it reaches, and what it builds


@rule(
    "reachable-modules",
    f"may use a module only as module.name (never as a value: not in a container, a variable, an argument "
    f"or a return value), reaching no module but {', '.join(sorted(REACHABLE_MODULES))}",
    per_node=True,
)
def _reachable_modules(node, source):
    """The modules reachable through an allowed one (torch.sys, F.torch.os, nn.modules.module), and
    modules handed around as values ([nn.init][0], m = torch.nn, f(F), return torch): once a module is
    a value, no rule knows what the attributes read off it are."""
    if isinstance(node, ast.Attribute):
        chain = attribute_chain(node)
        for obj in reached(chain, source.modules) if chain and chain[0] in source.modules else []:
            if isinstance(obj, types.ModuleType) and obj.__name__ not in REACHABLE_MODULES:
                return (
                    f"{ast.unparse(node)!r} reaches the module {obj.__name__}: blocks may use "
                    f"{', '.join(sorted(REACHABLE_MODULES))}"
                )
    if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
        if isinstance(source.known_object(node), types.ModuleType):
            parent, written = source.parents.get(id(node)), ast.unparse(node)
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                return f"the module {written!r} used as a value: use it only as {written}.<name>"
    return None


def _is_super(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _attribute_allowed(node, source) -> bool:
    name = node.attr
    if name == "__init__" and _is_super(node.value):
        return True  # super().__init__(...)
    if "hook" in name or name.startswith("__"):
        return False
    receiver = source.known_object(node.value)
    if isinstance(receiver, types.ModuleType):  # a module's own attributes: the listed ones only
        return name in ALLOWED_ATTRIBUTES or (receiver.__name__ in ANY_ATTRIBUTE_MODULES and not name.startswith("_"))
    if name in ALLOWED_ATTRIBUTES:  # a module's name (nn, init, ...) only along a module chain
        return name not in module_attribute_names()
    own = name in source.own_attributes and name not in reserved_attributes()
    return own and _on_own_object(node.value, source) and (not name.startswith("_") or root_name(node) == "self")


def _on_own_object(node, source) -> bool:
    """self or a class of the program, or what those hold by name (self.sub): the objects whose
    attribute names the program defines. Anything else (an item of a list, a call's result, a
    parameter) may be any object, and a name the program gives its own attributes says nothing of it."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and (node.id == "self" or node.id in source.classes)


@rule(
    "attribute-allow-list",
    "attributes only from this list, besides math.<any> and what the program itself defines (self.<name> it "
    "assigns, its functions and classes, buffers it registers: only on self or its classes; private ones only "
    "as self._name; none named like an attribute of torch.Tensor or nn.Module); no hooks, state dicts, .data, "
    "grad_fn or __dunders__ "
    f"(super().__init__ is the one): {', '.join(sorted(ALLOWED_ATTRIBUTES, key=lambda n: (n.lower(), n)))}",
    per_node=True,
)
def _attributes(node, source):
    """Every attribute a model does not need: hooks, state dicts, .data, grad_fn and next_functions,
    storages, frames and code objects, file and process functions, process-wide settings; and
    match-class patterns, which read attributes without naming them as such."""
    if isinstance(node, ast.MatchClass):
        return "class patterns in match statements read attributes: use isinstance(...) and plain attributes"
    if not isinstance(node, ast.Attribute) or _attribute_allowed(node, source):
        return None
    name = node.attr
    if "hook" in name:
        fix = "blocks register no hooks: compute what you need where it is used"
    elif name.startswith("__"):
        fix = "no dunder attributes (super().__init__(...) is the one)"
    elif name.startswith("_"):
        fix = "private attributes only as self._name, a name the program assigns"
    elif name in module_attribute_names():
        fix = f"a module only as a chain of modules (torch.nn.{name}), never off another object"
    elif name in source.own_attributes and name not in reserved_attributes():
        fix = "the program's own attributes only on self or a class of the program (self.x, self.sub.x)"
    elif name in source.own_attributes:
        fix = "it names an attribute of tensors, modules or Python's own objects: give yours another name"
    else:
        fix = ATTRIBUTE_FIXES.get(name, "use the tensor and module operations the rules list")
    return f"{ast.unparse(node)!r}: the attribute {name!r} is not on the allow-list: {fix}"


def _names_a_dtype(node) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in dtype_names() or "dtype" in node.attr
    return isinstance(node, ast.Name) and (
        "dtype" in node.id or (node.id in dtype_names() and node.id not in dir(builtins))
    )


def _visibly_sizes(arg) -> bool:
    """An argument that can only be a size (or sizes), never a dtype."""
    if isinstance(arg, ast.UnaryOp):
        arg = arg.operand
    if isinstance(arg, ast.Constant):
        return isinstance(arg.value, int) and not isinstance(arg.value, bool)
    if isinstance(arg, ast.Attribute):
        return arg.attr == "shape"
    if isinstance(arg, ast.Call):
        return isinstance(arg.func, ast.Attribute) and arg.func.attr == "size"
    return isinstance(arg, (ast.Tuple, ast.List, ast.Starred, ast.BinOp, ast.Subscript))


@rule("view-sizes", ".view(...) on a tensor with its sizes only (x.view(B, T, -1)); .to(dtype) converts", True)
def _view_sizes(node, source):
    """Reinterpreting a tensor's bits as another dtype: x.view(torch.int32), x.view(dtype=...), and
    .view taken off a tensor or a class to be called with anything."""
    if not (isinstance(node, ast.Attribute) and node.attr == "view"):
        return None
    call = source.parents.get(id(node))
    if not (isinstance(call, ast.Call) and call.func is node) or source.known_object(node.value) is not None:
        return f"{ast.unparse(node)!r}: call .view(...) on a tensor, with its sizes (or use .reshape(...))"
    if call.keywords or any(_names_a_dtype(sub) for arg in call.args for sub in ast.walk(arg)):
        return f"{ast.unparse(call)[:60]!r}: .view(...) takes sizes only, never a dtype: use .to(dtype) to convert"
    if len(call.args) == 1 and not _visibly_sizes(call.args[0]):
        return (
            f"{ast.unparse(call)[:60]!r}: one argument to .view that is not visibly a size (a dtype would "
            f"reinterpret the bits): write the sizes out, x.view(B, T, -1), or use .reshape(...)"
        )
    return None


@rule(
    "classes",
    "classes derive from nn.Module or nothing (or a class of the program), with no metaclass; super() takes "
    "no arguments or (TheClass, self)",
    per_node=True,
)
def _classes(node, source):
    """Metaclasses, tensor subclasses whose methods lie to the fixed code, super() on another object."""
    if _is_super(node) and node.args:
        args = node.args
        if not (len(args) == 2 and all(isinstance(a, ast.Name) for a in args) and args[1].id == "self"):
            return "super() takes no arguments here, or (TheClass, self)"
    if not isinstance(node, ast.ClassDef):
        return None
    if node.keywords:
        return f"class {node.name} takes keywords (a metaclass): a block's classes are plain or nn.Module"
    import torch.nn

    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in source.classes | {"object"}:
            continue
        known = source.known_object(base)
        if not (isinstance(known, type) and issubclass(known, torch.nn.Module)):
            return (
                f"class {node.name} derives from {ast.unparse(base)}: a block's classes derive from "
                f"nn.Module (or a class of the program), or from nothing"
            )
    return None


def _class_names(node):
    """The names a class defines: its methods, its class attributes, every self.<name> its methods assign."""
    names = [n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for statement in node.body:
        if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names += [n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and root_name(n) == "self":
            names.append(n.attr)
    return names


@rule(
    "definitions",
    f"no decorator but {', '.join('@' + d for d in sorted(ALLOWED_DECORATORS))} (no staticmethod, "
    "classmethod), none on __init__; no dunder method but __init__; a class redefines nothing nn.Module "
    "defines (state_dict, parameters, to, training, ...) but forward",
    per_node=True,
)
def _definitions(node, source):
    """__getattr__, __call__ and every other dunder; decorators that make a method run on a class; a
    module that answers state_dict(), parameters() or its own calls with something else than it is."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return None
    if node.name.startswith("__") and node.name != "__init__":
        return f"defining {node.name!r}: a block defines no dunder but __init__"
    clash = (
        [name for name in _class_names(node) if name in module_machinery()] if isinstance(node, ast.ClassDef) else []
    )
    if clash:
        return f"class {node.name} redefines {clash[0]!r}, which nn.Module defines: give it another name"
    for decorator in node.decorator_list:
        if ast.unparse(decorator) not in ALLOWED_DECORATORS or node.name == "__init__":
            return (
                f"the decorator @{ast.unparse(decorator)} is not allowed (allowed: "
                f"{', '.join(sorted(ALLOWED_DECORATORS))}, and none on __init__)"
            )
    return None


# ---------------------------------------------------------------------------------------------
# The pipeline

INTEGRITY_RULES = ("evolve-block-markers", "fixed-code")


def _message(rule: str, line: int | None, text: str) -> str:
    if rule == "syntax":  # Python's own words, as callers have always read them: "syntax error at line N: ..."
        return text
    return f"line {line}: {rule}: {text}" if line else f"{rule}: {text}"


def find_violation(text: str, reference: str, rules=None) -> Violation | None:
    """The first rule the program breaks (of RULES in order, or of those named in `rules`), or None."""
    source = Source(text, reference)
    for checked in [r for r in RULES if rules is None or r.name in rules]:
        try:
            found = checked.check(source)
        except (RecursionError, MemoryError):  # a check walks what the parser built: answered, never raised
            found = None, "the code nests too deeply to check: nest expressions less deeply"
        if found:
            return Violation(checked.name, found[0], _message(checked.name, *found))
    return None


def integrity_violation(text: str, reference: str) -> str | None:
    """The text outside the EVOLVE-BLOCKs (markers included) equals the reference's."""
    found = find_violation(text, reference, INTEGRITY_RULES)
    return str(found) if found else None


def static_violation(text: str, reference: str) -> str | None:
    """Every rule in order: the one line of the first one broken, or None."""
    found = find_violation(text, reference)
    return str(found) if found else None
