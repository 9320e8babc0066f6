"""The offline mutator: a seeded, LLM-free search operator that OpenEvolve calls like an LLM.

It reads the parent and the other programs from the prompt and answers with SEARCH/REPLACE edits
inside the EVOLVE-BLOCKs, each named by its move: one or two structural moves on blocks it wrote (it
reads the program as a `Design` of knobs, changes one and writes the block again; the knobs reach
the selection rule, the index score's form, the schedule's shape and the indexer's training target),
or line moves on constants of blocks an LLM rewrote, or, alone, a crossover with another program of
the prompt (each knob from one of the two parents, so that gains found apart stack). The no-LLM
baseline; plugged in through OpenEvolve's `init_client` (see `offline_client`), which must be a
module-level function so that worker processes can rebuild it.
"""

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass

from ..program.blocks import split_blocks

ACTIVATIONS = ("F.relu", "F.gelu", "F.silu", "F.softplus", "torch.sigmoid")
FRACTIONS = ("1 / 8", "1 / 4", "1 / 3", "1 / 2", "2 / 3", "3 / 4", "7 / 8")
DIVISORS = (1, 2, 4, 8, 16)
RECENT_SHARES = (0.0, 0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75)
K_SHARES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625, 0.03125)
SMALL_K_SHARES = (1 / 32, 1 / 16)  # 4 or 8 of the 128 keys: a local window and a few keys by score
RECENCY_SLOPES = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)
N_LAYERS, SEQ_LEN = 4, 128  # the fixed model's, for moves that must keep the schedule not uniform
NAME = "offline-mutator"
INIT_CALL = r"nn\.init\.normal_\(p, mean=0\.0, std="  # the indexer's init, as a pattern
ACTIVATION_NAMES = {"F.relu": "ReLU", "F.gelu": "GELU", "F.silu": "SiLU", "F.softplus": "Softplus"}  # else sigmoid


def _fraction(text: str) -> float:
    """A number or `a / b` as the blocks write them; never evaluated (the text is the parent's code)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e-?\d+)?)\s*(?:/\s*([0-9.]+)\s*)?", text)
    if not m:
        raise ValueError(f"not a number: {text!r}")
    return float(m[1]) / (float(m[2]) if m[2] else 1.0)


def _number(x: float) -> str:
    return f"{x:.4g}" if "e" not in f"{x:.4g}" else f"{x:.2e}"


def _layers(values) -> str:
    return "(" + ", ".join(_number(v) for v in values) + ")"


@dataclass(frozen=True)
class Design:
    """The knobs of a program the mutator writes itself; the defaults are the initial program."""

    heads: int = 4
    head_dim: int = 32
    activation: str = "F.relu"
    head_weights: str = "linear"  # "linear" (w . relu(dots) / sqrt(H)) or "softmax" over the heads
    recency_slope: tuple = (0.0,) * N_LAYERS  # per layer: index score lost per position between query and key
    recent_share: tuple = (0.0,) * N_LAYERS  # per layer: share of k kept for the most recent keys
    sink_keys: int = 0  # the first keys every query keeps
    k_shares: tuple | None = None  # None: the progressive schedule below; else k / seq_len per layer
    dense_until: str = "1 / 3"
    middle_until: str = "2 / 3"
    middle_divisor: int = 4
    late_divisor: int = 2
    loss_weight: float = 0.1
    target_sharpness: float = 1.0  # the target p ** a, renormalised
    kl_keys: str = "selected"  # the keys softmax(I) spans: "selected" or "causal" (every past key)
    init_std: float = 0.02

    def __post_init__(self):  # one recency slope (a number, as in older designs) is every layer's
        slopes = self.recency_slope if isinstance(self.recency_slope, tuple) else (self.recency_slope,)
        object.__setattr__(self, "recency_slope", slopes * N_LAYERS if len(slopes) == 1 else slopes)

    def schedule(self, n_layers=N_LAYERS, seq_len=SEQ_LEN) -> list[int]:
        """What the written layer_k_schedule returns (the same arithmetic)."""
        ks, shares = [], self.k_shares
        for i in range(n_layers):
            depth = (i + 0.5) / n_layers
            if shares is not None:
                k = round(shares[min(len(shares) - 1, i * len(shares) // n_layers)] * seq_len)
            elif depth < _fraction(self.dense_until):
                k = seq_len
            elif depth < _fraction(self.middle_until):
                k = seq_len // self.middle_divisor
            else:
                k = seq_len // self.late_divisor
            ks.append(max(1, min(seq_len, k)))
        return ks


# ---------------------------------------------------------------------------------------------
# Writing each block from a design (the defaults give the initial program's blocks, to the byte)


def indexer_block(d: Design) -> str:
    softmax, recency, per_layer = d.head_weights == "softmax", any(d.recency_slope), len(set(d.recency_slope)) > 1
    # One slope for every layer is written as one number, as programs had it before slopes per layer
    slopes, per = (_layers(d.recency_slope), "per layer: ") if per_layer else (_number(d.recency_slope[0]), "")
    slope = "self.recency_slope" if per_layer else "RECENCY_SLOPE"
    formula = "sum_j softmax_j(w[t])" if softmax else "sum_j w[t,j]"
    formula += f" * {ACTIVATION_NAMES.get(d.activation, 'sigmoid')}(q[t,j] . k[s])"
    formula += " - slope[layer] * (t - s)" if per_layer else " - slope * (t - s)" if recency else ""
    score = f'torch.einsum("bth,bhts->bts", w, {d.activation}(dots))'
    w = "w = self.w_proj(x).softmax(dim=-1)" if softmax else "w = self.w_proj(x) * self.n_heads**-0.5"
    return (
        "# May change: how the indexer scores keys (heads, dims, activation, weighting, positions), per layer.\n"
        "# Must hold: forward(x[B,T,C]) -> scores[B,T,T] where scores[b,t,s] uses only x[b,:t+1] and x[b,s];\n"
        "# the indexers of all layers stay within the 2.0M budget with the fixed model's 1.53M (4 bytes a value).\n"
        f"INDEXER_HEADS = {d.heads}  # H_I query heads\n"
        f"INDEXER_HEAD_DIM = {d.head_dim}  # d_I, also the size of the one key shared by all heads\n"
        + (f"RECENCY_SLOPE = {slopes}  # {per}index score lost per position between query and key\n" if recency else "")
        + "\n\nclass LightningIndexer(nn.Module):\n"
        f'    """I[t,s] = {formula}: H_I query heads, one key shared by all heads.\n'
        '    `layer` (0 = first) is the attention layer this indexer serves: every layer may differ."""\n'
        "\n    def __init__(self, d_model, layer):\n"
        "        super().__init__()\n"
        "        self.n_heads, self.head_dim = INDEXER_HEADS, INDEXER_HEAD_DIM\n"
        + ("        self.recency_slope = RECENCY_SLOPE[min(layer, len(RECENCY_SLOPE) - 1)]\n" if per_layer else "")
        + "        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)\n"
        "        self.k_proj = nn.Linear(d_model, self.head_dim, bias=False)\n"
        "        self.w_proj = nn.Linear(d_model, self.n_heads, bias=False)\n"
        "\n    def components(self, x):\n"
        '        """q[B,T,H,D], k[B,T,D], w[B,T,H]; the 1/sqrt scales live here so the score is the bare formula."""\n'
        "        B, T, _ = x.shape\n"
        "        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim) * self.head_dim**-0.5\n"
        "        k = self.k_proj(x)\n"
        f"        {w}\n"
        "        return q, k, w\n"
        "\n    def forward(self, x):\n"
        "        q, k, w = self.components(x)\n"
        '        dots = torch.einsum("bthd,bsd->bhts", q, k)\n'
        + (
            f"        scores = {score}\n"
            "        pos = torch.arange(x.shape[1], device=x.device)\n"
            "        distance = (pos[:, None] - pos[None, :]).clamp_min(0).to(scores.dtype)\n"
            f"        return scores - {slope} * distance\n"
            if recency
            else f"        return {score}\n"
        )
        + "\n\n"
    )


def selector_block(d: Design) -> str:
    mixed = any(d.recent_share) or d.sink_keys
    return (
        "# May change: which keys each query keeps, given index scores and the layer's budget k.\n"
        "# Must hold: returns BoolTensor[B,T,T]; row t keeps between 1 and min(k, t+1) keys, all with s <= t.\n"
        + (
            f"RECENT_SHARE = {_layers(d.recent_share)}  # per layer: share of k kept for the most recent keys\n"
            f"SINK_KEYS = {d.sink_keys}  # the first keys of the window, kept by every query (an attention sink)\n"
            "\n\ndef select_topk(scores, k, layer):\n"
            '    """Keep min(k, t+1) keys s <= t of every query t: the most recent int(k * RECENT_SHARE[layer]) '
            "keys and\n"
            '    the first SINK_KEYS whatever their score, the rest by highest index score."""\n'
            if mixed
            else "def select_topk(scores, k, layer):\n"
            '    """Keep the min(k, t+1) highest-scoring keys s <= t of every query t '
            '(the same rule in every layer)."""\n'
        )
        + "    T = scores.shape[-1]\n"
        "    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()\n"
        "    if k >= T:\n"
        "        return causal.expand_as(scores)\n"
        + (
            "    pos = torch.arange(T, device=scores.device)\n"
            "    distance = pos[:, None] - pos[None, :]  # t - s\n"
            "    recent = int(k * RECENT_SHARE[min(layer, len(RECENT_SHARE) - 1)])\n"
            "    forced = causal & ((distance < recent) | (pos[None, :] < SINK_KEYS))\n"
            '    priority = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))\n'
            "    top = priority.topk(k, dim=-1).indices\n"
            if mixed
            else '    candidates = scores.masked_fill(~causal, float("-inf"))\n'
            "    top = candidates.topk(k, dim=-1).indices\n"
        )
        + "    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)\n"
        "    # Rows t < k-1 have fewer than k past keys, so top-k also returns future (-inf) slots:\n"
        "    # the AND with the causal mask is what removes them, not the -inf.\n"
        "    return selected & causal\n\n\n"
    )


def schedule_block(d: Design) -> str:
    head = (
        "# May change: how many keys each layer keeps (the per-layer sparsity schedule).\n"
        "# Must hold: layer_k_schedule(n_layers, seq_len) -> list of n_layers ints in [1, seq_len], not all equal.\n"
    )
    ks = ", ".join(str(k) for k in d.schedule())
    if d.k_shares is not None:
        return head + (
            f"K_SHARE = {_layers(d.k_shares)}  # keys kept per layer as a share of seq_len, first layer first\n"
            "\n\ndef layer_k_schedule(n_layers, seq_len):\n"
            '    """One share of seq_len per layer, read at each layer\'s place in the stack (any number of layers).\n'
            f'    For 4 layers and L = 128: {ks}."""\n'
            "    ks = []\n"
            "    for i in range(n_layers):\n"
            "        share = K_SHARE[min(len(K_SHARE) - 1, i * len(K_SHARE) // n_layers)]\n"
            "        ks.append(max(1, min(seq_len, round(share * seq_len))))\n"
            "    return ks\n\n\n"
        )
    named = (d.dense_until, d.middle_until, d.middle_divisor, d.late_divisor) == ("1 / 3", "2 / 3", 4, 2)
    name = "PROGRESSIVE_SPARSE: dense early" if named else "Progressive: dense early"
    return head + (
        f"DENSE_UNTIL = {d.dense_until}  # layers at relative depth below this attend to every past key\n"
        f"MIDDLE_UNTIL = {d.middle_until}  # then seq_len // MIDDLE_DIVISOR keys up to this depth, "
        "seq_len // LATE_DIVISOR after it\n"
        f"MIDDLE_DIVISOR = {d.middle_divisor}\n"
        f"LATE_DIVISOR = {d.late_divisor}\n"
        "\n\ndef layer_k_schedule(n_layers, seq_len):\n"
        f'    """{name}, L/{d.middle_divisor} in the middle, L/{d.late_divisor} late; layer i sits at relative depth\n'
        f'    (i + 0.5) / n_layers. For 4 layers and L = 128: {ks}."""\n'
        "    ks = []\n"
        "    for i in range(n_layers):\n"
        "        depth = (i + 0.5) / n_layers\n"
        "        if depth < DENSE_UNTIL:\n"
        "            k = seq_len\n"
        "        elif depth < MIDDLE_UNTIL:\n"
        "            k = seq_len // MIDDLE_DIVISOR\n"
        "        else:\n"
        "            k = seq_len // LATE_DIVISOR\n"
        "        ks.append(max(1, min(seq_len, k)))\n"
        "    return ks\n\n\n"
    )


def training_block(d: Design) -> str:
    sharpen, causal = d.target_sharpness != 1.0, d.kl_keys == "causal"
    keys, mask = ("every past key", "causal") if causal else ("each query's selected keys", "selected")
    why = "p = 0 off the selection: q pushed down there" if causal else "zero outside the selection, where p = 0"
    sharpness = f"TARGET_SHARPNESS = {_number(d.target_sharpness)}  # the target p ** a, renormalised (1: p itself)\n"
    causal_mask = (
        "    T = scores.shape[-1]\n    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()\n"
    )
    return (
        "# May change: the indexer's training signal, its weight and the indexer's initialisation.\n"
        "# Must hold: indexer_aux_loss returns a finite scalar; it trains the indexer only (its input is detached).\n"
        f"INDEXER_LOSS_WEIGHT = {_number(d.loss_weight)}  # small next to the LM loss: the indexer only has to "
        "rank keys\n"
        + (sharpness if sharpen else "")
        + "\n\ndef indexer_aux_loss(attn_probs, scores, selected, layer):\n"
        f'    """DeepSeek-V3.2\'s indexer loss: KL(p || softmax(I)) over {keys}.\n'
        "\n    attn_probs[B,H,T,T] is the main attention (already detached), summed over heads and\n"
        "    renormalised into the target p; scores[B,T,T] are the index scores; selected[B,T,T] the keys\n"
        "    kept; `layer` the attention layer (0 = first).\n"
        '    """\n'
        "    target = attn_probs.sum(dim=1)\n"
        + ("    target = target.clamp_min(0).pow(TARGET_SHARPNESS)\n" if sharpen else "")
        + "    target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-9)\n"
        + (causal_mask if causal else "")
        + f'    log_q = scores.masked_fill(~{mask}, float("-inf")).log_softmax(dim=-1).masked_fill(~{mask}, 0.0)\n'
        f"    kl = target * (target.clamp_min(1e-9).log() - log_q)  # {why}\n"
        "    return INDEXER_LOSS_WEIGHT * kl.sum(dim=-1).mean()\n"
        "\n\ndef init_indexer(indexer, layer):\n"
        "    for p in indexer.parameters():\n"
        f"        nn.init.normal_(p, mean=0.0, std={_number(d.init_std)})\n\n\n"
    )


WRITERS = {
    "lightning_indexer": indexer_block,
    "topk_selector": selector_block,
    "k_schedule": schedule_block,
    "indexer_training": training_block,
}


def with_design(code: str, design: Design) -> str:
    """The program with every block the mutator knows written from `design`."""
    for block in split_blocks(code)[1]:
        if block.name in WRITERS:
            code = code.replace(block.body, WRITERS[block.name](design))
    return code


# ---------------------------------------------------------------------------------------------
# Reading a design back from a program


def _constant(code: str, name: str):
    m = re.search(rf"^{name} = (.+?)(  #.*)?$", code, re.MULTILINE)
    return m[1] if m else None


def _tuple(text: str) -> tuple:
    return tuple(_fraction(v) for v in text.strip("()").split(","))


def _fraction_text(text: str) -> str:
    _fraction(text)  # a number, or refused
    return text


def read_design(code: str) -> tuple[Design, set[str]]:
    """The design a program's blocks would have, and the blocks that are what `WRITERS` write for it."""
    d, found = Design(), {}
    try:
        for name, field, parse in (
            ("INDEXER_HEADS", "heads", int),
            ("INDEXER_HEAD_DIM", "head_dim", int),
            ("RECENCY_SLOPE", "recency_slope", _tuple),
            ("RECENT_SHARE", "recent_share", _tuple),
            ("SINK_KEYS", "sink_keys", int),
            ("K_SHARE", "k_shares", _tuple),
            ("DENSE_UNTIL", "dense_until", _fraction_text),
            ("MIDDLE_UNTIL", "middle_until", _fraction_text),
            ("MIDDLE_DIVISOR", "middle_divisor", int),
            ("LATE_DIVISOR", "late_divisor", int),
            ("INDEXER_LOSS_WEIGHT", "loss_weight", float),
            ("TARGET_SHARPNESS", "target_sharpness", float),
        ):
            if (value := _constant(code, name)) is not None:
                found[field] = parse(value)
        if m := re.search(r'einsum\("bth,bhts->bts", w, (\S+)\(dots\)\)', code):
            found["activation"] = m[1]
        if "w = self.w_proj(x).softmax(dim=-1)" in code:
            found["head_weights"] = "softmax"
        if "log_q = scores.masked_fill(~causal" in code:
            found["kl_keys"] = "causal"
        if m := re.search(rf"{INIT_CALL}([0-9.e+-]+)\)", code):
            found["init_std"] = float(m[1])
        d = dataclasses.replace(d, **found)
    except (ValueError, ZeroDivisionError, TypeError):
        return Design(), set()
    bodies = {b.name: b.body for b in split_blocks(code)[1]}
    known = {name for name, write in WRITERS.items() if bodies.get(name) == write(d)}
    return d, known


# ---------------------------------------------------------------------------------------------
# Structural moves: each changes one knob of the design (the block is then written again)

CHOICES = [  # (move, block, knob, options): the knob takes another of its options
    ("indexer heads", "lightning_indexer", "heads", (1, 2, 4, 8)),
    ("indexer head size", "lightning_indexer", "head_dim", (8, 16, 32, 64)),
    ("index score activation", "lightning_indexer", "activation", ACTIVATIONS),
    ("index score head weights", "lightning_indexer", "head_weights", ("linear", "softmax")),
    ("selection sink keys", "topk_selector", "sink_keys", (0, 1, 2, 4)),
    ("schedule dense until", "k_schedule", "dense_until", FRACTIONS),
    ("schedule middle until", "k_schedule", "middle_until", FRACTIONS),
    ("schedule middle divisor", "k_schedule", "middle_divisor", DIVISORS),
    ("schedule late divisor", "k_schedule", "late_divisor", DIVISORS),
    ("indexer loss weight", "indexer_training", "loss_weight", (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 1.0)),
    ("indexer target sharpness", "indexer_training", "target_sharpness", (0.5, 1.0, 2.0, 4.0)),
    ("indexer loss keys", "indexer_training", "kl_keys", ("selected", "causal")),
    ("indexer init scale", "indexer_training", "init_std", (0.005, 0.01, 0.02, 0.04, 0.08)),
]


def _other(options, current, rng):
    return rng.choice([o for o in options if o != current])


def _one_layer(values: tuple, options, rng):
    layer = rng.randrange(len(values))
    return values[:layer] + (_other(options, values[layer], rng),) + values[layer + 1 :]


def _every_layer(knob, options):
    return lambda d, rng: dataclasses.replace(d, **{knob: (_other(options, getattr(d, knob)[0], rng),) * N_LAYERS})


def _of_one_layer(knob, options):
    return lambda d, rng: dataclasses.replace(d, **{knob: _one_layer(getattr(d, knob), options, rng)})


def _schedule_per_layer(d, rng):
    """From the progressive form to one share per layer (the same ks), then one layer's share changed."""
    shares = d.k_shares or tuple(k / SEQ_LEN for k in d.schedule())
    return dataclasses.replace(d, k_shares=_one_layer(shares, K_SHARES, rng))


def _small_k_with_recent_keys(d, rng):
    """A middle layer (or each) keeps 4 or 8 keys, a share of them the most recent (schedule and selection)."""
    shares = [k / SEQ_LEN for k in d.schedule()]  # one share a layer, the same ks (the form the schedule takes)
    recent = [d.recent_share[min(i, len(d.recent_share) - 1)] for i in range(N_LAYERS)]  # as select_topk reads it
    k_share, recent_share = rng.choice(SMALL_K_SHARES), rng.choice(RECENT_SHARES[1:])
    for layer in rng.sample(range(1, N_LAYERS - 1), rng.randint(1, N_LAYERS - 2)):
        shares[layer], recent[layer] = k_share, recent_share
    return dataclasses.replace(d, k_shares=tuple(shares), recent_share=tuple(recent))


def _choice(knob, options):
    return lambda d, rng: dataclasses.replace(d, **{knob: _other(options, getattr(d, knob), rng)})


MOVES = [(move, (block,), _choice(knob, options)) for move, block, knob, options in CHOICES] + [
    ("index score recency", ("lightning_indexer",), _every_layer("recency_slope", RECENCY_SLOPES)),
    ("index score recency of one layer", ("lightning_indexer",), _of_one_layer("recency_slope", RECENCY_SLOPES)),
    ("selection recent keys", ("topk_selector",), _every_layer("recent_share", RECENT_SHARES)),
    ("selection recent keys of one layer", ("topk_selector",), _of_one_layer("recent_share", RECENT_SHARES)),
    ("schedule per layer", ("k_schedule",), _schedule_per_layer),
    ("small middle k with recent keys", ("k_schedule", "topk_selector"), _small_k_with_recent_keys),
]


def _valid(d: Design) -> bool:
    """What a move must keep: a schedule that is not one k everywhere (the judge refuses it)."""
    return len(set(d.schedule())) > 1


def _rewrites(design: Design, new: Design, blocks) -> dict[str, tuple[str, str]]:
    """block -> (old text, new text) for each of `blocks` that `new` writes differently from `design`."""
    texts = {b: (WRITERS[b](design).rstrip("\n"), WRITERS[b](new).rstrip("\n")) for b in blocks}
    return {b: (old, new) for b, (old, new) in texts.items() if old != new}


# ---------------------------------------------------------------------------------------------
# Crossover: a child of the parent and another program of the prompt, so that gains found on two
# branches of the search meet in one program (a structural move only ever adds one)

KNOBS = {  # the knobs each block is written from
    "lightning_indexer": ("heads", "head_dim", "activation", "head_weights", "recency_slope"),
    "topk_selector": ("recent_share", "sink_keys"),
    "k_schedule": ("k_shares", "dense_until", "middle_until", "middle_divisor", "late_divisor"),
    "indexer_training": ("loss_weight", "target_sharpness", "kl_keys", "init_std"),
}
# Crossover only recombines values the archive holds; new values come from the other moves alone, so
# they keep most children (7 in 10), and 3 in 10 let gains found apart meet within a few iterations.
CROSSOVER_SHARE = 0.3


def _genes(d: Design, blocks) -> dict:
    """What crossover passes on whole: each knob, a per-layer knob layer by layer, the schedule's knobs together."""
    genes = {"schedule": {knob: getattr(d, knob) for knob in KNOBS["k_schedule"]}} if "k_schedule" in blocks else {}
    for knob in (knob for block in blocks if block != "k_schedule" for knob in KNOBS[block]):
        value = getattr(d, knob)
        genes |= {(knob, i): v for i, v in enumerate(value)} if isinstance(value, tuple) else {knob: value}
    return genes


def _differences(d: Design, other: Design, blocks) -> dict:
    """The genes in which `other` differs from `d`, with its values (none if a per-layer knob's layers differ)."""
    mine, theirs = _genes(d, blocks), _genes(other, blocks)
    return {g: v for g, v in theirs.items() if mine[g] != v} if mine.keys() == theirs.keys() else {}


def crossover(d: Design, other: Design, blocks, rng: random.Random) -> Design:
    """A child that is neither parent: of the genes (two or more) in which `other` differs from `d`,
    a non-empty proper share from `other`, the rest from `d`."""
    differences = _differences(d, other, blocks)
    taken = rng.sample(list(differences), rng.randint(1, len(differences) - 1))
    knobs = {}
    for gene, value in (_genes(d, blocks) | {g: differences[g] for g in taken}).items():
        if isinstance(gene, tuple):  # one layer of a per-layer knob, in layer order
            knobs[gene[0]] = knobs.get(gene[0], ()) + (value,)
        else:
            knobs |= value if gene == "schedule" else {gene: value}
    return dataclasses.replace(d, **knobs)


# ---------------------------------------------------------------------------------------------
# Line moves, for blocks the mutator did not write: (name, line pattern, rewrite(match, rng))


def _scaled(factors, low, high):
    return lambda m, rng: (
        f"{m['head']}{_number(min(max(float(m['value']) * rng.choice(factors), low), high))}{m['tail']}"
    )


def _replaced(options):
    return lambda m, rng: f"{m['head']}{_other([str(o) for o in options], m['value'], rng)}{m['tail']}"


def _line(head, value=r"[0-9.e+-]+", tail=r"(  #.*)?"):
    return re.compile(rf"^(?P<head>{head})(?P<value>{value})(?P<tail>{tail})$")


_ACTIVATION = "|".join(map(re.escape, ACTIVATIONS))  # as a pattern
LINE_MOVES = [
    ("indexer loss weight", _line("INDEXER_LOSS_WEIGHT = "), _scaled([0.25, 0.5, 2.0, 4.0], 1e-4, 10.0)),
    ("indexer heads", _line("INDEXER_HEADS = ", r"\d+"), _replaced((1, 2, 4, 8))),
    ("indexer head size", _line("INDEXER_HEAD_DIM = ", r"\d+"), _replaced((8, 16, 32, 64))),
    ("index score activation", _line(r".*\b", _ACTIVATION, r"\(dots\).*"), _replaced(ACTIVATIONS)),
    ("schedule thresholds", _line("(?:DENSE|MIDDLE)_UNTIL = ", r"\d+ / \d+"), _replaced(FRACTIONS)),
    ("schedule divisors", _line("(?:MIDDLE|LATE)_DIVISOR = ", r"\d+"), _replaced(DIVISORS)),
    ("indexer init scale", _line(rf"\s+{INIT_CALL}", tail=r"\).*"), _scaled([0.5, 2.0], 1e-5, 1.0)),
]


def _line_edits(code: str, blocks, rng) -> list[tuple[str, str, str]]:
    """Candidate line moves on the lines of the given blocks, each old line unique in the program
    (OpenEvolve replaces the first match)."""
    lines = code.splitlines()
    candidates = []
    for b in blocks:
        for i in range(b.start + 1, b.end):
            for name, pattern, rewrite in LINE_MOVES:
                if (m := pattern.match(lines[i])) and lines.count(lines[i]) == 1:
                    new = rewrite(m, rng)
                    if new != lines[i]:
                        candidates.append((name, lines[i], new))
    return candidates


def propose_edits(code: str, rng: random.Random, max_moves: int = 2, others=()) -> list[tuple[str, str, str]]:
    """(move name, old text, new text) edits inside the blocks: now and then a crossover with one of
    `others` ((label, code) of the prompt's other programs), else one or two moves, structural on the
    blocks this module wrote, line moves on the others; at most one move per block or line."""
    design, known = read_design(code)
    mates = []  # the other programs crossover may pair with: two genes apart at least, in blocks both wrote
    for label, other_code in others:
        other, wrote = read_design(other_code)
        blocks = [b for b in WRITERS if b in known & wrote]
        if len(_differences(design, other, blocks)) >= 2:
            mates.append((label, other, blocks))
    if mates and rng.random() < CROSSOVER_SHARE:
        label, other, blocks = rng.choice(mates)
        child = crossover(design, other, blocks, rng)
        if _valid(child):  # not when it takes a schedule with one k everywhere (a failed program's)
            return [(f"crossover with {label}", old, new) for old, new in _rewrites(design, child, blocks).values()]
    blocks = split_blocks(code)[1]
    line_moves = {}  # move name -> its first candidate edit, in the order of the lines (no set: hash order varies)
    for edit in _line_edits(code, [b for b in blocks if b.name not in known], rng):
        line_moves.setdefault(edit[0], edit)
    options = [move for move in MOVES if set(move[1]) <= known] + [(name, None, None) for name in line_moves]
    rng.shuffle(options)
    wanted, edits, touched = rng.randint(1, max_moves), [], set()
    for name, move_blocks, change in options:
        if wanted == 0:
            break
        if move_blocks is None:  # a line move in a block this module did not write
            new, rewrites = design, {line_moves[name][1]: line_moves[name][1:]}
        else:
            for _ in range(8):  # a move may hit a schedule with one k everywhere: draw again
                new = change(design, rng)
                if _valid(new) and (rewrites := _rewrites(design, new, move_blocks)):
                    break
            else:
                continue
        if rewrites.keys() & touched:  # blocks or lines
            continue
        edits += [(name, old, new_text) for old, new_text in rewrites.values()]
        touched |= rewrites.keys()
        design, wanted = new, wanted - 1
    return edits


def format_diff(edits) -> str:
    """OpenEvolve's SEARCH/REPLACE format, one block per edit, with a line naming the moves (each once)."""
    parts = [f"Offline mutator: {', '.join(dict.fromkeys(name for name, _, _ in edits))}."]
    for _, old, new in edits:
        parts.append(f"<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE")
    return "\n\n".join(parts) + "\n"


CURRENT_PROGRAM = re.compile(r"# Current Program\s*```[a-z]*\n(?P<code>.*?)\n```", re.DOTALL)


# The other programs OpenEvolve shows (top, diverse, inspiration): a heading with a score over a code
# fence, "### Program 2 (Score: 0.0019)" or "### Inspiration 1 (Score: 0.0018, Type: Exploratory)"
OTHER_PROGRAM = re.compile(
    r"^### (?P<title>[^\n]+?) \(Score: (?P<score>[^,)\n]+)[^\n]*\n```[a-z]*\n(?P<code>.*?)\n```",
    re.DOTALL | re.MULTILINE,
)


def parent_program(prompt: str) -> str:
    if not (m := CURRENT_PROGRAM.search(prompt)):
        raise ValueError("the prompt has no '# Current Program' code block")
    return m["code"]


def other_programs(prompt: str) -> list[tuple[str, str]]:
    """(label, code) of each other program in the prompt, once: the label names it as the prompt does,
    with its score and the start of its code's sha256, so that a crossover names its second parent."""
    found = {}
    for m in OTHER_PROGRAM.finditer(prompt):
        digest = hashlib.sha256(m["code"].encode()).hexdigest()[:8]
        found.setdefault(m["code"], f"{m['title']} (score {m['score']}, code {digest})")
    return [(label, code) for code, label in found.items()]


class OfflineMutator:
    """Answers OpenEvolve's generate_with_context with a diff; same prompt and iteration, same diff."""

    def __init__(self, model_cfg=None):
        self.model = NAME
        self.base_seed = getattr(model_cfg, "random_seed", None) or 0

    async def generate_with_context(self, system_message, messages, **kwargs):
        prompt = messages[-1]["content"]
        parent = parent_program(prompt)
        digest = hashlib.sha256(f"{self.base_seed}:{kwargs.get('seed')}:{parent}".encode()).hexdigest()
        edits = propose_edits(parent, random.Random(int(digest[:16], 16)), others=other_programs(prompt))
        if not edits:
            raise ValueError("no line inside the EVOLVE-BLOCKs that the offline mutator knows how to change")
        return format_diff(edits)


def offline_client(model_cfg):
    """OpenEvolve's init_client hook (module level: workers rebuild it from its import path)."""
    return OfflineMutator(model_cfg)
