"""Static checks: what a child may write inside its EVOLVE-BLOCKs, before any of it runs."""

import pytest

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.checks import static_violation

REFERENCE = INITIAL_PROGRAM.read_text()
ANCHOR = "def init_indexer(indexer, layer):\n"  # inside the indexer_training block


def with_block_code(code):
    assert ANCHOR in REFERENCE
    return REFERENCE.replace(ANCHOR, code + "\n" + ANCHOR)


def test_initial_program_passes_every_static_check():
    assert static_violation(REFERENCE, REFERENCE) is None


def test_harmless_reformatting_outside_blocks_is_accepted():
    reformatted = REFERENCE.replace("import math\n", "import math   \n") + "\n\n"
    assert static_violation(reformatted, REFERENCE) is None


def test_child_editing_outside_blocks_is_rejected():
    edited = REFERENCE.replace("FFN_HIDDEN = 768", "FFN_HIDDEN = 1024")
    failure = static_violation(edited, REFERENCE)
    assert "outside the EVOLVE-BLOCKs changed" in failure and "line 29" in failure


def test_child_adding_code_after_the_last_block_is_rejected():
    assert "added or removed" in static_violation(REFERENCE + "\nprint('hi')\n", REFERENCE)


def test_changed_model_config_line_is_rejected():
    edited = REFERENCE.replace("n_layers=4, d_model=128", "n_layers=6, d_model=128")
    assert "outside the EVOLVE-BLOCKs changed" in static_violation(edited, REFERENCE)


def test_removed_block_marker_is_rejected():
    edited = REFERENCE.replace("# EVOLVE-BLOCK-END\n", "", 1)
    assert "markers broken" in static_violation(edited, REFERENCE)


def test_syntax_error_names_its_line():
    assert static_violation(with_block_code("def f(:"), REFERENCE).startswith("syntax error at line")


@pytest.mark.parametrize(
    "code, rule",
    [
        ("import os", "import of 'os' is not allowed"),
        ("import subprocess", "import of 'subprocess'"),
        ("from torch.utils import cpp_extension", "import of 'torch.utils'"),
        ("from torch import load", "importing 'load'"),
        ("x = open('/etc/passwd').read()", "'open' is not allowed"),
        ("x = eval('1')", "'eval' is not allowed"),
        ("x = __import__('os')", "'__import__' is not allowed"),
        ("x = getattr(torch, 'lo' + 'ad')", "'getattr' is not allowed"),
        ("x = torch.load", "attribute 'load'"),
        ("x = ().__class__.__bases__", "dunder attribute"),
        ("x = torch._C", "private attribute '_C'"),
        ("F.cross_entropy = lambda *a, **k: 0", "assignment to 'F.cross_entropy'"),
        ("def f():\n    T = torch.Tensor\n    T.exp = None", "assignment to 'T.exp'"),
        ("MODEL_CONFIG['n_layers'] = 8", "assignment into 'MODEL_CONFIG'"),
        ("def f():\n    global INDEXER_LOSS_WEIGHT", "global/nonlocal"),
        # self is only ever a method's first parameter, so self.x = ... always means the object
        ("import math as self", "importing as 'self'"),
        ("self = F", "assignment to the name 'self'"),
        ("def patch(self):\n    return self", "not the first parameter of a method"),
        ("class A:\n    def f(a, self):\n        return self", "not the first parameter of a method"),
        # the ways from a value back to the interpreter
        ("def g():\n    yield 1\nFRAME = g().gi_frame", "attribute 'gi_frame'"),
        ("def f(e):\n    return e.tb_frame.f_back", "attribute 'f_back'"),
        ("def f(fn):\n    return fn.co_consts", "attribute 'co_consts'"),
        ("def f(x: 'print(1)'):\n    return x", "string annotations"),
        ("import functools", "import of 'functools'"),
        ("import typing", "import of 'typing'"),
        ("torch.nn.modules.module.register_module_forward_hook(print)", "register_module_forward_hook"),
        ("def apply_rope(x, cos, sin):\n    return x", "redefines 'apply_rope'"),
        ("FFN_HIDDEN = 4096", "redefines 'FFN_HIDDEN'"),
        ("import math as torch", "redefines 'torch'"),
        # self.x = ... only where self is the new object: a method handed a class or a module cannot
        # patch it (Rebind.to(PLASAAttention, forward) once replaced the fixed attention)
        ("class Rebind:\n    def to(self, fn):\n        self.forward = fn", "outside __init__"),
        ("class R:\n    @staticmethod\n    def __init__(self, fn):\n        self.forward = fn", "staticmethod"),
        (
            "class R:\n    def __init__(self, fn):\n        self.forward = fn\n    __init__ = staticmethod(__init__)",
            "binding the name '__init__'",
        ),
        ("class R:\n    @property\n    def __init__(self):\n        pass", "none on __init__"),
        ("class R:\n    def __init__(self):\n        pass\n    __call__ = print", "binding the name '__call__'"),
        ("class R:\n    def __getattr__(self, name):\n        return 1", "defining '__getattr__'"),
        ("class M(nn.Module, metaclass=print):\n    pass", "takes keywords"),
        ("x = type(F)", "'type' is not allowed"),
        ("def f(x):\n    return super(x, F)", "super() takes no arguments"),
        # classes are modules (or plain): no tensor subclass whose methods lie to the fixed code
        ("class T(torch.Tensor):\n    def detach(self):\n        return self", "derives from torch.Tensor"),
        ("class D(dict):\n    pass", "derives from dict"),
        # modules only as module.name, and only the allowed ones through their attributes
        ("x = torch.sys.modules", "reaches the module sys"),
        ("x = F.torch.os.getpid", "reaches the module os"),
        ("x = torch.nn.modules.module", "reaches the module torch.nn.modules"),
        ("t = torch\nx = t.sys", "the module 'torch' used as a value"),
        ("x = [F][0]", "the module 'F' used as a value"),
        ("x = torch.compile", "attribute 'compile'"),
    ],
)
def test_forbidden_block_code_is_rejected_with_its_rule(code, rule):
    failure = static_violation(with_block_code(code), REFERENCE)
    assert failure is not None and rule in failure and failure.startswith("line ")


def test_reimporting_the_same_modules_inside_a_block_is_allowed():
    code = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\nimport math"
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
        "        self.w = nn.Linear(d, 1)\n\n    @torch.no_grad()\n    def norms(self):\n"
        "        return torch.linalg.vector_norm(self.w.weight) + math.sqrt(2.0)\n\n"
        "class Wide(nn.Linear):\n    pass\n\nclass Plain:\n    pass\n\n"
        "def scale(x):\n    nn.init.normal_(x)\n    return F.relu(x) * torch.special.expit(x)"
    )
    assert static_violation(with_block_code(code), REFERENCE) is None
