"""Static checks: what a child may write inside its EVOLVE-BLOCKs, before any of it runs."""

import ast
import re

import pytest
import torch

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import METRIC_KEYS
from plasa_lab.program.allowlists import ALLOWED_ATTRIBUTES, ALLOWED_BUILTINS, MAX_PROGRAM_CHARS, NOT_LINE_ENDS
from plasa_lab.program.blocks import program_lines
from plasa_lab.program.checks import RULES, find_violation, static_violation
from plasa_lab.program.prompting import HEADING, SYSTEM_MESSAGE, static_rules_text

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


@pytest.mark.parametrize("name", [n for n in INPUTS_THAT_BREAK_PARSERS if "surrogate" not in n])  # no file holds one
def test_openevolves_entry_point_answers_them_with_the_rules_one_line(name, tmp_path):
    import evaluator

    code, rule, _ = INPUTS_THAT_BREAK_PARSERS[name]
    child = with_block_code(code)
    (tmp_path / "child.py").write_text(child, encoding="utf-8")
    result = evaluator.evaluate(str(tmp_path / "child.py"))
    assert set(METRIC_KEYS) <= set(result.metrics) and result.metrics["combined_score"] == 0.0
    assert (
        result.artifacts["failure"] == f"stage 1: {static_violation(child, REFERENCE)}"
        and rule in result.artifacts["failure"]
    )


def test_openevolves_entry_point_answers_a_program_that_is_not_utf8_with_one_line(tmp_path):
    import evaluator

    (tmp_path / "child.py").write_bytes(with_block_code("x = 1").encode() + b"\xff\xfe")
    result = evaluator.evaluate(str(tmp_path / "child.py"))
    assert set(METRIC_KEYS) <= set(result.metrics) and result.metrics["combined_score"] == 0.0
    assert "not UTF-8 text" in result.artifacts["failure"] and "\n" not in result.artifacts["failure"]


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
        ("del apply_rope", "fixed-names", "redefines 'apply_rope'"),
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
        # round three: a module through a container, under a name the program gave its own attribute
        (
            "class Names:\n    def __init__(self):\n        self.torch = self.os = None\nx = [nn.init][0].torch.os",
            "reachable-modules",
            "the module 'nn.init' used as a value",
        ),
        ("m = torch.nn", "reachable-modules", "the module 'torch.nn' used as a value"),
        ("x = (nn.init,)", "reachable-modules", "the module 'nn.init' used as a value"),
        ("x = {'m': F}", "reachable-modules", "the module 'F' used as a value"),
        ("def f(m=nn.init):\n    return m", "reachable-modules", "the module 'nn.init' used as a value"),
        ("def f():\n    return torch.nn", "reachable-modules", "the module 'torch.nn' used as a value"),
        ("x = len(torch.linalg)", "reachable-modules", "the module 'torch.linalg' used as a value"),
        ("x = nn.init if True else None", "reachable-modules", "the module 'nn.init' used as a value"),
        ("x = (m := F)", "reachable-modules", "the module 'F' used as a value"),
        ("x = lambda: torch", "reachable-modules", "the module 'torch' used as a value"),
        ("def f():\n    yield torch.special", "reachable-modules", "the module 'torch.special' used as a value"),
        ("x = [*[math]]", "reachable-modules", "the module 'math' used as a value"),
        ("x = [torch][0].nn", "reachable-modules", "the module 'torch' used as a value"),
        # names the program defines, only on its own objects; module names only along module chains
        (
            "class Names:\n    def __init__(self):\n        self.torch = None\ndef f(x):\n    return x.torch",
            "attribute-allow-list",
            "only on self or a class of the program",
        ),
        (
            "class Names:\n    def __init__(self):\n        self.os = None\nx = [1][0].os",
            "attribute-allow-list",
            "only on self or a class of the program",
        ),
        ("def f(x):\n    return x.nn.init", "attribute-allow-list", "a module only as a chain of modules"),
        ("x = json.loads('1')", "attribute-allow-list", "the attribute 'loads'"),  # the fixed code's imports
        ("x = time.sleep(1)", "attribute-allow-list", "the attribute 'sleep'"),
    ],
)
def test_forbidden_block_code_is_refused_by_its_rule(code, rule, phrase):
    found = find_violation(with_block_code(code), REFERENCE)
    assert found is not None and found.rule == rule, found
    assert found.message.startswith(f"line {found.line}: {rule}: ") and phrase in found.message, found.message
    assert "\n" not in found.message


def test_the_programs_own_attributes_and_module_chains_are_allowed_on_what_they_are():
    code = (
        "class Gate(nn.Module):\n    def scale(self):\n        return 2.0\n\n    def __init__(self, d):\n"
        "        super().__init__()\n        self.sub = nn.Linear(d, 1)\n        self.gain = Gate.scale(self)\n\n"
        "    def forward(self, x):\n"
        "        return self.sub(x) * self.gain + self.sub.weight.sum() + len(list(self.modules()))\n\n"
        "def g(x):\n    nn.init.normal_(x)\n    return torch.nn.functional.relu(torch.linalg.vector_norm(x))"
    )
    assert static_violation(with_block_code(code), REFERENCE) is None


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


# ---------------------------------------------------------------------------------------------
# what an LLM writes, and what an attacker writes

SELECTOR, INDEXER, TRAINING = "def select_topk(", "class LightningIndexer(", "def indexer_aux_loss("
PLAUSIBLE_VARIANTS = {
    "recency window by position": (
        SELECTOR,
        '''
def select_topk(scores, k, layer):
    """Keep the k most recent past keys of each query, whatever the scores say."""
    T = scores.shape[-1]
    pos = torch.arange(T, device=scores.device)
    distance = pos[:, None] - pos[None, :]
    return ((distance >= 0) & (distance < k)).expand_as(scores)
''',
    ),
    "a mixture of score and recency": (
        SELECTOR,
        """
RECENCY_WEIGHT = 0.5


def select_topk(scores, k, layer):
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    if k >= T:
        return causal.expand_as(scores)
    pos = torch.arange(T, device=scores.device, dtype=scores.dtype)
    recency = -(pos[:, None] - pos[None, :]).clamp_min(0) / T
    z = (scores - scores.mean(dim=-1, keepdim=True)) / (scores.std(dim=-1, keepdim=True) + 1e-6)
    mixed = (z + RECENCY_WEIGHT * recency).masked_fill(~causal, float("-inf"))
    top = mixed.topk(min(k, T), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & causal
""",
    ),
    "per-layer rules": (
        SELECTOR,
        """
def select_topk(scores, k, layer):
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    if layer == 0 or k >= T:
        return causal.expand_as(scores)
    if layer == 3:  # the last layer always keeps the first token, an attention sink
        sink = torch.zeros(T, T, dtype=torch.bool, device=scores.device)
        sink[:, 0] = True
        scores = scores.masked_fill(sink, float("inf"))
    elif layer in (1, 2):
        scores = scores + torch.linspace(0, 1e-3, T, device=scores.device)
    top = scores.masked_fill(~causal, float("-inf")).topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & causal
""",
    ),
    "torch.where rules": (
        SELECTOR,
        """
def select_topk(scores, k, layer):
    T = scores.shape[-1]
    pos = torch.arange(T, device=scores.device)
    causal = pos[None, :] <= pos[:, None]
    local = (pos[:, None] - pos[None, :]) < 4
    boosted = torch.where(local & causal, scores + 1e4, scores)
    boosted = torch.where(causal, boosted, torch.full_like(scores, float("-inf")))
    top = boosted.topk(min(k, T), dim=-1).indices
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, top, True)
    return keep & causal
""",
    ),
    "a multi-head indexer with per-head weights and a position bias": (
        INDEXER,
        '''
class LightningIndexer(nn.Module):
    """Per-head keys, learned per-head weights, and a learned bias by distance."""

    def __init__(self, d_model, layer):
        super().__init__()
        self.n_heads, self.head_dim = INDEXER_HEADS, INDEXER_HEAD_DIM
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.head_weight = nn.Parameter(torch.ones(self.n_heads) / self.n_heads)
        self.distance_bias = nn.Embedding(MODEL_CONFIG["seq_len"], 1)
        self.register_buffer("positions", torch.arange(MODEL_CONFIG["seq_len"]), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim)
        dots = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_dim)
        scores = torch.einsum("h,bhts->bts", F.softmax(self.head_weight, dim=0), F.gelu(dots))
        pos = self.positions[:T]
        distance = (pos[:, None] - pos[None, :]).clamp(min=0)
        return scores + self.distance_bias(distance).squeeze(-1)
''',
    ),
    "an indexer with a causal shift by F.pad, a norm and a different head count per layer": (
        INDEXER,
        """
class LightningIndexer(nn.Module):
    def __init__(self, d_model, layer):
        super().__init__()
        self.n_heads = 2 if layer == 0 else INDEXER_HEADS
        self.head_dim = INDEXER_HEAD_DIM
        self.norm = nn.LayerNorm(d_model)
        self.shift_mix = nn.Parameter(torch.zeros(d_model))
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim)
        self.k_proj = nn.Linear(d_model, self.head_dim)
        self.w_proj = nn.Linear(d_model, self.n_heads)

    def forward(self, x):
        B, T, C = x.shape
        previous = F.pad(x, (0, 0, 1, 0))[:, :T]  # x one position later: causal, like a width-2 conv
        x = self.norm(x + torch.sigmoid(self.shift_mix) * previous)
        q = self.q_proj(x).reshape(B, T, self.n_heads, -1)
        k = F.normalize(self.k_proj(x), dim=-1)
        w = self.w_proj(x).softmax(dim=-1)
        dots = torch.einsum("bthd,bsd->bhts", q, k).transpose(1, 2)
        return (w.unsqueeze(-1) * F.silu(dots)).sum(dim=2)
""",
    ),
    "a temperature in the aux loss and a fan-in init": (
        TRAINING,
        """
INDEXER_LOSS_WEIGHT = 0.05
TEMPERATURE = 2.0


def indexer_aux_loss(attn_probs, scores, selected, layer):
    target = attn_probs.sum(dim=1)
    target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    log_q = F.log_softmax((scores / TEMPERATURE).masked_fill(~selected, float("-inf")), dim=-1)
    log_q = torch.where(selected, log_q, torch.zeros_like(log_q))
    kl = target * (target.clamp_min(1e-9).log() - log_q)
    weight = INDEXER_LOSS_WEIGHT * (2.0 if layer > 1 else 1.0)
    return weight * kl.sum(dim=-1).mean()


def init_indexer(indexer, layer):
    for name, p in indexer.named_parameters():
        if p.dim() > 1:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        elif "bias" in name:
            nn.init.zeros_(p)
        else:
            with torch.no_grad():
                p.copy_(torch.ones_like(p) / len(p))
""",
    ),
    "a schedule computed from a list": (
        "def layer_k_schedule(",
        """
def layer_k_schedule(n_layers, seq_len):
    fractions = [1.0, 0.25, 0.375, 0.5]
    ks = [max(1, min(seq_len, int(math.ceil(seq_len * f)))) for f in fractions[:n_layers]]
    return ks + [seq_len // 2] * (n_layers - len(ks))
""",
    ),
}


@pytest.mark.parametrize("name", list(PLAUSIBLE_VARIANTS))
def test_plausible_llm_variants_pass(name):
    first_line, code = PLAUSIBLE_VARIANTS[name]
    assert static_violation(with_block_tail(first_line, code), REFERENCE) is None


INIT = "        self.w_proj = nn.Linear(d_model, self.n_heads, bias=False)\n"
FORWARD = "        q, k, w = self.components(x)\n"
ATTACKS = {
    "a parameter written through .data": (
        "    for p in indexer.parameters():\n",
        "        p.data.zero_()\n",
        "attribute-allow-list",
    ),
    "a forward hook on its own module": (INIT, "        self.register_forward_hook(print)\n", "attribute-allow-list"),
    "a state-dict hook": (INIT, "        self._register_state_dict_hook(print)\n", "attribute-allow-list"),
    "a hook registered by hand": (INIT, "        self._forward_hooks = {0: print}\n", "attribute-allow-list"),
    "the autograd graph": (FORWARD, "        n = x.grad_fn.next_functions\n", "attribute-allow-list"),
    "a state dict": (FORWARD, "        s = self.state_dict()\n", "attribute-allow-list"),
    "bits as another dtype": (FORWARD, "        x = x.view(torch.int32).float()\n", "view-sizes"),
    "bits by keyword": (FORWARD, "        x = x.view(dtype=torch.float64)\n", "view-sizes"),
    "bits through a name": (FORWARD, "        d = torch.int32\n        x = x.view(d)\n", "view-sizes"),
    "bits through the unbound method": (FORWARD, "        x = torch.Tensor.view(x, torch.int32)\n", "view-sizes"),
    "the storage": (FORWARD, "        s = x.untyped_storage()\n", "attribute-allow-list"),
    "set_": (FORWARD, "        x.set_(torch.zeros(3))\n", "attribute-allow-list"),
    "a pointer": (FORWARD, "        p = x.data_ptr()\n", "attribute-allow-list"),
    "an instance dict": (FORWARD, "        d = self.__dict__\n", "attribute-allow-list"),
    "str.format reading dunders": (FORWARD, '        s = "{0.__class__}".format(x)\n', "attribute-allow-list"),
    "a match pattern reading .data": (
        FORWARD,
        "        match x:\n            case torch.Tensor(data=d):\n                pass\n",
        "attribute-allow-list",
    ),
    "a comprehension assigning a library function": (
        FORWARD,
        "        [0 for F.relu in [print]]\n",
        "attribute-assignment",
    ),
    "a numpy view of the memory": (FORWARD, "        a = x.numpy()\n", "attribute-allow-list"),
    "a module that answers state_dict() itself": (INIT, "        self.state_dict = dict\n", "attribute-allow-list"),
    "a module that says it has no parameters": (
        '        return torch.einsum("bth,bhts->bts", w, F.relu(dots))\n',
        "\n    def parameters(self, recurse=True):\n        return iter([])\n",
        "definitions",
    ),
    "a module whose extra state rides in its state dict": (
        '        return torch.einsum("bth,bhts->bts", w, F.relu(dots))\n',
        "\n    get_extra_state = dict\n",
        "definitions",
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_are_refused_by_the_rule_that_closes_them(name):
    anchor, line, rule = ATTACKS[name]
    assert anchor in REFERENCE
    found = find_violation(REFERENCE.replace(anchor, anchor + line, 1), REFERENCE)
    assert found is not None and found.rule == rule, (name, found)


def test_defining_an_attribute_named_like_a_forbidden_one_does_not_unlock_it():
    """A program's own names unlock that name everywhere: not for names of tensors', modules' or
    the interpreter's attributes (def data(self) must not make p.data legal)."""
    for name in ("data", "grad_fn", "gi_frame", "f_back", "state_dict", "format", "next_functions"):
        code = f"class Own(nn.Module):\n    def {name}(self):\n        return 1\n\n\ndef f(p):\n    return p.{name}"
        found = find_violation(with_block_code(code), REFERENCE)
        assert found.rule == "attribute-allow-list" and "give yours another name" in found.message, name
    code = "class Own(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    code += "        self.register_buffer('data', torch.zeros(1))\n\n\ndef f(p):\n    return p.data"
    assert find_violation(with_block_code(code), REFERENCE).rule == "attribute-allow-list"


def test_a_decorator_on_a_blocks_last_line_cannot_decorate_the_fixed_class_after_it():
    child = REFERENCE.replace(
        "        nn.init.normal_(p, mean=0.0, std=0.02)\n",
        "        nn.init.normal_(p, mean=0.0, std=0.02)\n\n\n@torch.no_grad()\n",
        1,
    )
    found = find_violation(child, REFERENCE)
    assert found.rule == "block-statements" and "crosses an EVOLVE-BLOCK marker" in found.message


def test_a_string_left_open_cannot_swallow_a_marker():
    child = REFERENCE.replace("    return ks\n", "    return ks\n\n\n_ = '''\n", 1)
    child = child.replace("INDEXER_LOSS_WEIGHT = 0.1", "'''\nINDEXER_LOSS_WEIGHT = 0.1", 1)
    assert find_violation(child, REFERENCE).rule == "block-statements"


# ---------------------------------------------------------------------------------------------
# the rules as the LLM is told them


def test_every_rule_has_a_name_what_it_closes_and_what_it_allows():
    names = [r.name for r in RULES]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names)
    assert all(r.closes and r.allows and callable(r.check) for r in RULES)
    assert names[:3] == ["program-size", "line-ends", "syntax"]  # the text is read before it is parsed


def test_the_system_message_states_the_rules_as_the_checks_apply_them():
    """Regenerate with `python -m plasa_lab.program.prompting` when a rule changes."""
    system = SYSTEM_MESSAGE.read_text()
    assert static_rules_text() in system and system.count(HEADING) == 1
    flat = " ".join(system[system.index(HEADING) :].split())
    for rule in RULES:
        assert f"- {rule.name}: {' '.join(rule.allows.split())}" in flat


def test_the_attributes_and_builtins_shown_to_the_llm_are_the_allow_lists():
    flat = " ".join(SYSTEM_MESSAGE.read_text().split())
    attributes = re.search(r"is the one\): (.*?) - view-sizes:", flat)[1]
    builtins_shown = re.search(r"builtins only from: (.*?); no dunder names", flat)[1]
    assert set(attributes.split(", ")) == ALLOWED_ATTRIBUTES
    assert set(builtins_shown.split(", ")) == ALLOWED_BUILTINS


def test_every_allowed_attribute_is_one_that_torch_or_python_has():
    """A typo in the list would allow a name nobody meant."""
    import builtins

    owners = [torch, torch.Tensor, torch.nn, torch.nn.functional, torch.nn.init, torch.linalg, torch.special]
    owners += [torch.nn.Module, torch.nn.Linear(1, 1), torch.finfo(torch.float32), torch.return_types.topk, list, dict]
    assert [a for a in ALLOWED_ATTRIBUTES if not any(hasattr(owner, a) for owner in owners)] == []
    assert [b for b in ALLOWED_BUILTINS if not hasattr(builtins, b)] == []
