"""What block code may use, by name: the allow-lists that the static checks (plasa_lab.program.checks)
apply and the LLM's system message shows (plasa_lab.program.prompting), in one place.

Names are curated by what a PLASA block needs, not by what is known to be dangerous: anything not
listed is refused, so a new torch function or a forgotten builtin is closed until someone adds it.
"""

import types
from functools import cache

import yaml

from .. import PROJECT_ROOT

# OpenEvolve's max_code_length: the longest child a run accepts is the longest the checks read.
MAX_PROGRAM_CHARS = yaml.safe_load((PROJECT_ROOT / "config.yaml").read_text())["max_code_length"]
# Characters str.splitlines ends a line at and Python's tokenizer does not (it ends lines at \n, \r\n, \r).
NOT_LINE_ENDS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

ALLOWED_IMPORTS = {"math", "torch", "torch.nn", "torch.nn.functional"}
# Modules a block may reach as `module.attribute` chains (torch.sys, F.torch.os, nn.modules: no).
REACHABLE_MODULES = ALLOWED_IMPORTS | {"torch.nn.init", "torch.linalg", "torch.special"}
ANY_ATTRIBUTE_MODULES = {"math"}  # pure functions and constants: math.<anything public>
ALLOWED_DECORATORS = {"property", "torch.no_grad()", "torch.no_grad", "torch.inference_mode()"}
ALLOWED_BUILTINS = set(
    "abs all any bool dict divmod enumerate filter float frozenset int isinstance issubclass iter len list map repr "
    "max min next object pow print property range reversed round set slice sorted str sum super tuple zip "
    "Exception AssertionError IndexError KeyError NotImplementedError RuntimeError TypeError ValueError".split()
)
# What a PLASA block needs, by name on any object (a tensor's or a module's type is not known statically).
ALLOWED_ATTRIBUTES = set(
    # namespaces, layers, parameters
    "nn functional init linalg special Module Linear Parameter ParameterList Embedding ModuleList ModuleDict "
    "Sequential LayerNorm RMSNorm Dropout Identity ReLU GELU SiLU Tanh Sigmoid Softplus Softmax Conv1d Tensor "
    "parameters named_parameters children named_children modules named_modules apply forward training weight bias "
    "in_features out_features "
    "register_buffer register_parameter "
    # shapes, views, copies
    "shape size dim ndim numel dtype device T t view view_as reshape permute transpose contiguous unsqueeze "
    "squeeze expand expand_as flatten unflatten chunk split narrow cat stack roll flip repeat repeat_interleave "
    "tril triu tril_indices triu_indices diagonal diag clone detach "
    # dtypes and conversions (values converted, never bits reinterpreted)
    "to type_as float double half bool long int float16 float32 float64 bfloat16 int32 int64 item tolist "
    "finfo eps inf nan "
    # making tensors (random ones from the generator the judge seeds)
    "ones zeros ones_like zeros_like full full_like empty empty_like new_ones new_zeros new_full arange linspace eye "
    "tensor broadcast_to "
    "rand randn rand_like randn_like randint "
    # arithmetic, activations, comparisons
    "abs sqrt rsqrt pow exp log log1p expm1 log2 sin cos tanh sigmoid relu gelu silu softplus elu leaky_relu "
    "logsigmoid softmax log_softmax clamp clamp_min clamp_max clip sign floor ceil round square reciprocal neg "
    "maximum minimum where erf add sub mul div remainder fmod lerp nan_to_num isfinite isnan logical_and "
    "logical_or logical_not eq ne lt le gt ge einsum matmul mm bmm outer expit logit "
    # reductions, sorting, indexing
    "sum mean max min amax amin argmax argmin std var prod norm vector_norm logsumexp cumsum cumprod any all "
    "quantile median count_nonzero isinf cdist cosine_similarity "
    "argsort sort topk kthvalue values indices gather scatter scatter_ scatter_add index_select take_along_dim "
    "masked_fill masked_fill_ searchsorted bucketize "
    # torch.nn.functional
    "pad normalize layer_norm rms_norm linear dropout conv1d one_hot kl_div cross_entropy mse_loss "
    "binary_cross_entropy_with_logits "
    # in place, for initialisation under torch.no_grad() (nn.init.* and p.copy_(...))
    "copy_ fill_ zero_ mul_ div_ add_ sub_ clamp_ tril_ triu_ normal_ uniform_ calculate_gain trunc_normal_ "
    "constant_ ones_ zeros_ eye_ dirac_ xavier_uniform_ xavier_normal_ kaiming_uniform_ kaiming_normal_ "
    "orthogonal_ sparse_ "
    "no_grad inference_mode "
    # Python's lists and dicts
    "append extend insert pop items keys get update index pi".split()
)
REGISTERS = {"register_buffer", "register_parameter"}  # they define an attribute by the name they are given
# A hint for the attributes a block most often reaches for.
ATTRIBUTE_FIXES = {
    "data": "change a parameter in place with nn.init.* or p.copy_(...) under torch.no_grad()",
    "state_dict": "a block reads and writes no state dict: keep what it needs in its own modules",
    "load_state_dict": "a block reads and writes no state dict: keep what it needs in its own modules",
}


@cache
def reserved_attributes() -> frozenset:
    """Names a program may not give its own attributes (they would unlock the same name everywhere):
    the attributes of tensors, modules and autograd nodes, and of the interpreter's own objects
    (functions, generators, frames, tracebacks, code, cells, exceptions, classes), and str.format's."""
    import torch

    kinds = [torch.Tensor, torch.nn.Module, torch.autograd.graph.Node, type, BaseException, types.FunctionType]
    kinds += [types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType, types.FrameType]
    kinds += [types.TracebackType, types.CodeType, types.CellType, types.MethodType]
    return frozenset(name for kind in kinds for name in dir(kind)) | {"format", "format_map", "variable"}


@cache
def dtype_names() -> frozenset:
    import torch

    return frozenset(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))


@cache
def module_machinery() -> frozenset:
    """What nn.Module itself defines, on the class and on every instance (state_dict, parameters,
    _call_impl, training, ...): the fixed code and the judge rely on it, so no block class redefines
    it. `forward` is what a module is for; dunders are refused on their own."""
    import torch

    return frozenset(name for name in dir(torch.nn.Module()) if not name.startswith("__")) - {"forward"}


@cache
def module_attribute_names() -> frozenset:
    """Names on the attribute list that, on an allowed module, are a module (nn, functional, init,
    ...): allowed only along a module chain (torch.nn.init), never on an object of unknown kind
    (but for the methods of modules and tensors that share a name: nn.Module.modules())."""
    import importlib

    modules = [importlib.import_module(name) for name in REACHABLE_MODULES]
    names = {n for n in ALLOWED_ATTRIBUTES for m in modules if isinstance(getattr(m, n, None), types.ModuleType)}
    return frozenset(names - module_machinery() - set(dir(importlib.import_module("torch").Tensor)))
