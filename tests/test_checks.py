"""Static checks: what a child may write inside its EVOLVE-BLOCKs, before any of it runs."""

import ast

import pytest

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.allowlists import MAX_PROGRAM_CHARS, NOT_LINE_ENDS
from plasa_lab.checks import RULES, find_violation, static_violation
from plasa_lab.constants import METRIC_KEYS
from plasa_lab.program import program_lines

REFERENCE = INITIAL_PROGRAM.read_text()
ANCHOR = "def init_indexer(indexer, layer):\n"  # inside the indexer_training block


def with_block_code(code):
    assert ANCHOR in REFERENCE
    return REFERENCE.replace(ANCHOR, code + "\n" + ANCHOR)


def with_block_tail(first_line, code):
    """The initial program with everything from `first_line` to the end of its block replaced by `code`."""
    start = REFERENCE.index(first_line)
    end = REFERENCE.index("# EVOLVE-BLOCK-END", start)
    return REFERENCE[:start] + code.strip("\n") + "\n\n\n" + REFERENCE[end:]


def line_of(text, fragment):
    return next(i for i, line in enumerate(program_lines(text), 1) if fragment in line)


# ---------------------------------------------------------------------------------------------
# the whole text


def test_initial_program_passes_every_static_check():
    assert static_violation(REFERENCE, REFERENCE) is None


def test_harmless_reformatting_outside_blocks_is_accepted():
    reformatted = REFERENCE.replace("import math\n", "import math   \n") + "\n\n"
    assert static_violation(reformatted, REFERENCE) is None


def test_windows_and_old_mac_line_ends_are_lines_like_any_other():
    assert static_violation(REFERENCE.replace("\n", "\r\n"), REFERENCE) is None
    child = with_block_code("import os").replace("\n", "\r")
    found = find_violation(child, REFERENCE)
    assert found.rule == "imports" and found.line == line_of(with_block_code("import os"), "import os")


def test_child_editing_outside_blocks_is_rejected_at_its_line():
    edited = REFERENCE.replace("FFN_HIDDEN = 768", "FFN_HIDDEN = 1024")
    found = find_violation(edited, REFERENCE)
    assert found.rule == "fixed-code" and "outside the EVOLVE-BLOCKs changed" in found.message
    assert found.message.startswith(f"line {line_of(REFERENCE, 'FFN_HIDDEN = 768')}: fixed-code: ")


def test_child_adding_code_after_the_last_block_is_rejected():
    assert "added or removed" in static_violation(REFERENCE + "\nprint('hi')\n", REFERENCE)


def test_changed_model_config_line_is_rejected():
    edited = REFERENCE.replace("n_layers=4, d_model=128", "n_layers=6, d_model=128")
    assert find_violation(edited, REFERENCE).rule == "fixed-code"


def test_removed_block_marker_is_rejected():
    edited = REFERENCE.replace("# EVOLVE-BLOCK-END\n", "", 1)
    found = find_violation(edited, REFERENCE)
    assert found.rule == "evolve-block-markers" and "markers broken" in found.message


def test_syntax_error_names_its_line():
    child = with_block_code("def f(:")
    found = find_violation(child, REFERENCE)
    assert found.rule == "syntax" and found.message.startswith(f"syntax error at line {line_of(child, 'def f(:')}")


@pytest.mark.parametrize("separator", list(NOT_LINE_ENDS))
def test_lines_are_counted_as_python_counts_them_for_every_separator_it_does_not_know(separator):
    """Ten \\x1c in a comment once made the statement after them count as fixed code, never checked."""
    child = with_block_code(f"# a comment{separator * 10}more comment\nimport os")
    assert len(program_lines(child)) == ast.parse(child).body[-1].end_lineno == len(program_lines(REFERENCE)) + 2
    found = find_violation(child, REFERENCE)
    assert found.rule == "line-ends" and found.line == line_of(child, "a comment")
    # Without the rule that refuses the separator, the statement after it is still block code, checked.
    others = [r.name for r in RULES if r.name != "line-ends"]
    found = find_violation(child, REFERENCE, others)
    assert found.rule == "imports" and found.line == line_of(child, "import os")


INPUTS_THAT_BREAK_PARSERS = {
    "8,000 unary minus signs (MemoryError)": ("x = " + "-" * 8000 + "1", "syntax", "MemoryError"),
    "5,000 chained additions (RecursionError)": ("x = " + "+".join(["1"] * 5000), "syntax", "RecursionError"),
    "a NUL character": ("x = 1\x00", "syntax", "null bytes"),
    "a lone surrogate": ('x = "\udc80"', "syntax", "surrogates"),
    "3 MB of code": ("x = 1\n" * 500_000, "program-size", f"over the limit of {MAX_PROGRAM_CHARS:,}"),
}


@pytest.mark.parametrize("name", list(INPUTS_THAT_BREAK_PARSERS))
def test_every_input_is_answered_with_one_line(name):
    code, rule, phrase = INPUTS_THAT_BREAK_PARSERS[name]
    found = find_violation(with_block_code(code), REFERENCE)
    assert found.rule == rule and phrase in found.message and "\n" not in found.message
    assert str(found) == static_violation(with_block_code(code), REFERENCE)


def test_code_python_parses_but_cannot_compile_is_a_syntax_error():
    found = find_violation(with_block_code("return 1"), REFERENCE)
    assert found.rule == "syntax" and "'return' outside function" in found.message
    found = find_violation(with_block_code("y = (" + "+".join(["x"] * 2000) + ")"), REFERENCE)
    assert found.rule == "syntax" and "RecursionError" in found.message


def test_a_rule_that_cannot_walk_deep_code_refuses_it_instead_of_raising():
    found = find_violation(with_block_code("y = (" + "+".join(["x"] * 900) + ").data"), REFERENCE)
    assert found.rule == "attribute-allow-list" and "too deeply" in found.message and "\n" not in found.message


def test_the_size_limit_is_the_runs_max_code_length():
    import yaml

    from plasa_lab import PROJECT_ROOT

    assert MAX_PROGRAM_CHARS == yaml.safe_load((PROJECT_ROOT / "config.yaml").read_text())["max_code_length"]
    assert len(REFERENCE) < MAX_PROGRAM_CHARS


@pytest.mark.parametrize(
    "name, content, phrase",
    [
        *[
            (name, with_block_code(code).encode(), rule)
            for name, (code, rule, _) in INPUTS_THAT_BREAK_PARSERS.items()
            if "surrogate" not in name
        ],
        ("invalid UTF-8", with_block_code("x = 1").encode() + b"\xff\xfe", "not UTF-8 text"),
    ],
)
def test_openevolves_entry_point_answers_every_input_with_a_failure_naming_the_rule(name, content, phrase, tmp_path):
    import evaluator

    program = tmp_path / "child.py"
    program.write_bytes(content)
    result = evaluator.evaluate(str(program))
    assert set(METRIC_KEYS) <= set(result.metrics) and result.metrics["combined_score"] == 0.0
    failure = result.artifacts["failure"]
    assert phrase.replace("syntax", "syntax error") in failure and "\n" not in failure, failure


# ---------------------------------------------------------------------------------------------
# the block code: each rule on its own


@pytest.mark.parametrize(
    "code, rule, phrase",
    [
        ("import os", "imports", "import of 'os' is not allowed"),
        ("import subprocess", "imports", "import of 'subprocess'"),
        ("from torch.utils import cpp_extension", "imports", "import of 'torch.utils'"),
        ("from torch import load", "imports", "importing 'load'"),
        ("from torch.nn import modules", "imports", "importing 'modules'"),
        ("import functools", "imports", "import of 'functools'"),
        ("import typing", "imports", "import of 'typing'"),
        ("x = open('/etc/passwd').read()", "builtin-allow-list", "the builtin 'open' is not allowed"),
        ("x = eval('1')", "builtin-allow-list", "'eval'"),
        ("x = __import__('os')", "builtin-allow-list", "the name '__import__'"),
        ("x = getattr(torch, 'lo' + 'ad')", "builtin-allow-list", "'getattr'"),
        ("x = type(F)", "builtin-allow-list", "'type'"),
        ("x = torch.load", "attribute-allow-list", "the attribute 'load'"),
        ("x = torch.compile", "attribute-allow-list", "the attribute 'compile'"),
        ("x = ().__class__.__bases__", "attribute-allow-list", "no dunder attributes"),
        ("x = torch._C", "attribute-allow-list", "private attributes only as self._name"),
        ("torch.nn.modules.module.register_module_forward_hook(print)", "reachable-modules", "torch.nn.modules"),
        ("F.cross_entropy = lambda *a, **k: 0", "attribute-assignment", "assignment to 'F.cross_entropy'"),
        ("def f():\n    T = torch.Tensor\n    T.exp = None", "attribute-assignment", "assignment to 'T.exp'"),
        ("MODEL_CONFIG['n_layers'] = 8", "fixed-names", "assignment into 'MODEL_CONFIG'"),
        ("def apply_rope(x, cos, sin):\n    return x", "fixed-names", "redefines 'apply_rope'"),
        ("FFN_HIDDEN = 4096", "fixed-names", "redefines 'FFN_HIDDEN'"),
        ("import math as torch", "fixed-names", "redefines 'torch'"),
        ("def f():\n    global INDEXER_LOSS_WEIGHT", "global-nonlocal", "global/nonlocal"),
        # self is only ever a method's first parameter, so self.x = ... always means the object
        ("import math as self", "self-binding", "importing as 'self'"),
        ("self = F", "self-binding", "assignment to the name 'self'"),
        ("def patch(self):\n    return self", "self-binding", "not the first parameter of a method"),
        ("class A:\n    def f(a, self):\n        return self", "self-binding", "not the first parameter of a method"),
        # self.x = ... only where self is the new object: a method handed a class or a module cannot
        # patch it (Rebind.to(PLASAAttention, forward) once replaced the fixed attention)
        ("class Rebind:\n    def to(self, fn):\n        self.forward = fn", "attribute-assignment", "outside __init__"),
        (
            "class R:\n    @staticmethod\n    def __init__(self, fn):\n        self.forward = fn",
            "builtin-allow-list",
            "staticmethod",
        ),
        (
            "class R:\n    def __init__(self, fn):\n        self.forward = fn\n    __init__ = staticmethod(__init__)",
            "builtin-allow-list",
            "binding the name '__init__'",
        ),
        ("class R:\n    @property\n    def __init__(self):\n        pass", "definitions", "none on __init__"),
        ("class R:\n    def __init__(self):\n        pass\n    __call__ = print", "builtin-allow-list", "'__call__'"),
        ("class R:\n    def __getattr__(self, name):\n        return 1", "definitions", "defining '__getattr__'"),
        ("class M(nn.Module, metaclass=print):\n    pass", "classes", "takes keywords"),
        ("def f(x, y):\n    return super(x, y)", "classes", "super() takes no arguments"),
        # classes are modules (or plain): no tensor subclass whose methods lie to the fixed code
        ("class T(torch.Tensor):\n    def detach(self):\n        return self", "classes", "derives from torch.Tensor"),
        ("class D(dict):\n    pass", "classes", "derives from dict"),
        # the ways from a value back to the interpreter
        ("def g():\n    yield 1\nFRAME = g().gi_frame", "attribute-allow-list", "'gi_frame'"),
        ("def f(e):\n    return e.tb_frame.f_back", "attribute-allow-list", "'f_back'"),
        ("def f(fn):\n    return fn.co_consts", "attribute-allow-list", "'co_consts'"),
        ("def f(x: 'print(1)'):\n    return x", "string-annotations", "string annotations"),
        # modules only as module.name, and only the allowed ones through their attributes
        ("x = torch.sys.modules", "reachable-modules", "reaches the module sys"),
        ("x = F.torch.os.getpid", "reachable-modules", "reaches the module os"),
        ("x = torch.nn.modules.module", "reachable-modules", "reaches the module torch.nn.modules"),
        ("t = torch\nx = t.sys", "reachable-modules", "the module 'torch' used as a value"),
        ("x = [F][0]", "reachable-modules", "the module 'F' used as a value"),
        ("x = json.loads('1')", "attribute-allow-list", "the attribute 'loads'"),  # the fixed code's imports
        ("x = time.sleep(1)", "attribute-allow-list", "the attribute 'sleep'"),
    ],
)
def test_forbidden_block_code_is_refused_by_its_rule(code, rule, phrase):
    found = find_violation(with_block_code(code), REFERENCE)
    assert found is not None and found.rule == rule, found
    assert found.message.startswith(f"line {found.line}: {rule}: ") and phrase in found.message, found.message
    assert "\n" not in found.message


def test_reimporting_the_same_modules_inside_a_block_is_allowed():
    code = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\nimport math\nfrom math import sqrt"
    assert static_violation(with_block_code(code), REFERENCE) is None


def test_methods_may_assign_to_self():
    code = (
        "class Gate(nn.Module):\n    def __init__(self, d):\n        super().__init__()\n"
        "        self.w = nn.Linear(d, 1)"
    )
    assert static_violation(with_block_code(code), REFERENCE) is None


def test_what_models_need_is_allowed():
    code = (
        "class Gate(nn.Module):\n    def __init__(self, d):\n        super(Gate, self).__init__()\n"
        "        self.w = nn.Linear(d, 1)\n        self._scale = 2.0\n\n    @torch.no_grad()\n    def norms(self):\n"
        "        return torch.linalg.vector_norm(self.w.weight) * self._scale + math.sqrt(2.0)\n\n"
        "class Wide(nn.Linear):\n    pass\n\nclass Plain:\n    pass\n\n"
        "def scale(x):\n    nn.init.normal_(x)\n    return F.relu(x) * torch.special.expit(x) + math.log1p(math.pi)"
    )
    assert static_violation(with_block_code(code), REFERENCE) is None
