"""The offline mutator: a seeded, LLM-free search operator that OpenEvolve calls like an LLM.

It reads the parent program from the prompt and answers with one or two SEARCH/REPLACE edits
inside the EVOLVE-BLOCKs, each named by its move. Two kinds of move:

- Structural moves, on blocks it recognises: it reads the program as a `Design` (the knobs below),
  changes one knob and writes the block again. The knobs reach structure, not only constants: the
  selection rule composed from primitives (index score, a share of the most recent keys kept per
  layer, attention-sink keys), the index score's form (head weighting, a recency term), the
  schedule's shape (progressive thresholds, or one share of seq_len per layer), and the indexer's
  training target (sharpened, over the selected or over every past key).
- Line moves, on blocks an LLM has rewritten: a constant on a line it knows (loss weight, heads,
  head size, activation, schedule thresholds and divisors, init scale).

It is the no-LLM baseline of the system and lets the whole pipeline run without a network.
Plugged in through OpenEvolve's `init_client` (see `offline_client`), which must be a
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
RECENT_SHARES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)
K_SHARES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625)
RECENCY_SLOPES = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)
N_LAYERS, SEQ_LEN = 4, 128  # the fixed model's, for moves that must keep the schedule not uniform
NAME = "offline-mutator"


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
    recency_slope: float = 0.0  # index score lost per position between query and key
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

    def schedule(self, n_layers=N_LAYERS, seq_len=SEQ_LEN) -> list[int]:
        """What the written layer_k_schedule returns (the same arithmetic)."""
        ks = []
        for i in range(n_layers):
            if self.k_shares is not None:
                share = self.k_shares[min(len(self.k_shares) - 1, i * len(self.k_shares) // n_layers)]
                k = round(share * seq_len)
            else:
                depth = (i + 0.5) / n_layers
                if depth < _fraction(self.dense_until):
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
    recency = d.recency_slope > 0
    weighting = "softmax(dim=-1)" if d.head_weights == "softmax" else None
    formula = "sum_j w[t,j]" if weighting is None else "sum_j softmax_j(w[t])"
    recency_doc = " - slope * (t - s)" if recency else ""
    w_line = "w = self.w_proj(x).softmax(dim=-1)" if weighting else "w = self.w_proj(x) * self.n_heads**-0.5"
    ret = "scores = " if recency else "return "
    text = (
        "# May change: how the indexer scores keys (heads, dims, activation, weighting, positions), per layer.\n"
        "# Must hold: forward(x[B,T,C]) -> scores[B,T,T] where scores[b,t,s] uses only x[b,:t+1] and x[b,s];\n"
        "# the indexers of all layers stay within the 2.0M budget with the fixed model's 1.53M (4 bytes a value).\n"
        f"INDEXER_HEADS = {d.heads}  # H_I query heads\n"
        f"INDEXER_HEAD_DIM = {d.head_dim}  # d_I, also the size of the one key shared by all heads\n"
    )
    if recency:
        text += f"RECENCY_SLOPE = {_number(d.recency_slope)}  # index score lost per position between query and key\n"
    text += (
        "\n\nclass LightningIndexer(nn.Module):\n"
        f'    """I[t,s] = {formula} * {_act_doc(d.activation)}(q[t,j] . k[s]){recency_doc}: H_I query heads, '
        "one key shared by all heads.\n"
        '    `layer` (0 = first) is the attention layer this indexer serves: every layer may differ."""\n'
        "\n    def __init__(self, d_model, layer):\n"
        "        super().__init__()\n"
        "        self.n_heads, self.head_dim = INDEXER_HEADS, INDEXER_HEAD_DIM\n"
        "        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)\n"
        "        self.k_proj = nn.Linear(d_model, self.head_dim, bias=False)\n"
        "        self.w_proj = nn.Linear(d_model, self.n_heads, bias=False)\n"
        "\n    def components(self, x):\n"
        '        """q[B,T,H,D], k[B,T,D], w[B,T,H]; the 1/sqrt scales live here so the score is the bare formula."""\n'
        "        B, T, _ = x.shape\n"
        "        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim) * self.head_dim**-0.5\n"
        "        k = self.k_proj(x)\n"
        f"        {w_line}\n"
        "        return q, k, w\n"
        "\n    def forward(self, x):\n"
        "        q, k, w = self.components(x)\n"
        '        dots = torch.einsum("bthd,bsd->bhts", q, k)\n'
        f'        {ret}torch.einsum("bth,bhts->bts", w, {d.activation}(dots))\n'
    )
    if recency:
        text += (
            "        pos = torch.arange(x.shape[1], device=x.device)\n"
            "        distance = (pos[:, None] - pos[None, :]).clamp_min(0).to(scores.dtype)\n"
            "        return scores - RECENCY_SLOPE * distance\n"
        )
    return text + "\n\n"


def _act_doc(activation: str) -> str:
    return {"F.relu": "ReLU", "F.gelu": "GELU", "F.silu": "SiLU", "F.softplus": "Softplus"}.get(activation, "sigmoid")


def selector_block(d: Design) -> str:
    head = (
        "# May change: which keys each query keeps, given index scores and the layer's budget k.\n"
        "# Must hold: returns BoolTensor[B,T,T]; row t keeps between 1 and min(k, t+1) keys, all with s <= t.\n"
    )
    mixed = any(d.recent_share) or d.sink_keys
    if not mixed:
        return head + (
            "def select_topk(scores, k, layer):\n"
            '    """Keep the min(k, t+1) highest-scoring keys s <= t of every query t '
            '(the same rule in every layer)."""\n'
            "    T = scores.shape[-1]\n"
            "    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()\n"
            "    if k >= T:\n"
            "        return causal.expand_as(scores)\n"
            '    candidates = scores.masked_fill(~causal, float("-inf"))\n'
            "    top = candidates.topk(k, dim=-1).indices\n"
            "    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)\n"
            "    # Rows t < k-1 have fewer than k past keys, so top-k also returns future (-inf) slots:\n"
            "    # the AND with the causal mask is what removes them, not the -inf.\n"
            "    return selected & causal\n\n\n"
        )
    return head + (
        f"RECENT_SHARE = {_layers(d.recent_share)}  # per layer: share of k kept for the most recent keys\n"
        f"SINK_KEYS = {d.sink_keys}  # the first keys of the window, kept by every query (an attention sink)\n"
        "\n\ndef select_topk(scores, k, layer):\n"
        '    """Keep min(k, t+1) keys s <= t of every query t: the most recent int(k * RECENT_SHARE[layer]) keys and\n'
        '    the first SINK_KEYS whatever their score, the rest by highest index score."""\n'
        "    T = scores.shape[-1]\n"
        "    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()\n"
        "    if k >= T:\n"
        "        return causal.expand_as(scores)\n"
        "    pos = torch.arange(T, device=scores.device)\n"
        "    distance = pos[:, None] - pos[None, :]  # t - s\n"
        "    recent = int(k * RECENT_SHARE[min(layer, len(RECENT_SHARE) - 1)])\n"
        "    forced = causal & ((distance < recent) | (pos[None, :] < SINK_KEYS))\n"
        '    priority = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))\n'
        "    top = priority.topk(k, dim=-1).indices\n"
        "    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)\n"
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
    keys = "every past key" if causal else "each query's selected keys"
    text = (
        "# May change: the indexer's training signal, its weight and the indexer's initialisation.\n"
        "# Must hold: indexer_aux_loss returns a finite scalar; it trains the indexer only (its input is detached).\n"
        f"INDEXER_LOSS_WEIGHT = {_number(d.loss_weight)}  "
        "# small next to the LM loss: the indexer only has to rank keys\n"
    )
    if sharpen:
        text += f"TARGET_SHARPNESS = {_number(d.target_sharpness)}  # the target p ** a, renormalised (1: p itself)\n"
    text += (
        "\n\ndef indexer_aux_loss(attn_probs, scores, selected, layer):\n"
        f'    """DeepSeek-V3.2\'s indexer loss: KL(p || softmax(I)) over {keys}.\n'
        "\n    attn_probs[B,H,T,T] is the main attention (already detached), summed over heads and\n"
        "    renormalised into the target p; scores[B,T,T] are the index scores; selected[B,T,T] the keys\n"
        "    kept; `layer` the attention layer (0 = first).\n"
        '    """\n'
        "    target = attn_probs.sum(dim=1)\n"
    )
    if sharpen:
        text += "    target = target.clamp_min(0).pow(TARGET_SHARPNESS)\n"
    text += "    target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-9)\n"
    if causal:
        text += (
            "    T = scores.shape[-1]\n"
            "    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()\n"
            '    log_q = scores.masked_fill(~causal, float("-inf")).log_softmax(dim=-1).masked_fill(~causal, 0.0)\n'
            "    kl = target * (target.clamp_min(1e-9).log() - log_q)  # p = 0 off the selection: q pushed down there\n"
        )
    else:
        text += (
            '    log_q = scores.masked_fill(~selected, float("-inf")).log_softmax(dim=-1).masked_fill(~selected, 0.0)\n'
            "    kl = target * (target.clamp_min(1e-9).log() - log_q)  # zero outside the selection, where p = 0\n"
        )
    return text + (
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
    """The design a program's blocks would have, and the names of the blocks that are exactly what
    `WRITERS` write for it (the blocks the structural moves may rewrite)."""
    d, found = Design(), {}
    try:
        for name, field, parse in (
            ("INDEXER_HEADS", "heads", int),
            ("INDEXER_HEAD_DIM", "head_dim", int),
            ("RECENCY_SLOPE", "recency_slope", float),
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
        if m := re.search(r"nn\.init\.normal_\(p, mean=0\.0, std=([0-9.e+-]+)\)", code):
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
    ("index score recency", "lightning_indexer", "recency_slope", RECENCY_SLOPES),
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


def _one_layer(values, options, rng):
    values, layer = list(values), rng.randrange(len(values))
    values[layer] = _other(options, values[layer], rng)
    return tuple(values)


def _recent_keys(d, rng):
    return dataclasses.replace(d, recent_share=(_other(RECENT_SHARES, d.recent_share[0], rng),) * N_LAYERS)


def _recent_keys_of_one_layer(d, rng):
    return dataclasses.replace(d, recent_share=_one_layer(d.recent_share, RECENT_SHARES, rng))


def _schedule_per_layer(d, rng):
    """From the progressive form to one share per layer (the same ks), then one layer's share changed."""
    shares = d.k_shares or tuple(k / SEQ_LEN for k in d.schedule())
    return dataclasses.replace(d, k_shares=_one_layer(shares, K_SHARES, rng))


def _choice(knob, options):
    return lambda d, rng: dataclasses.replace(d, **{knob: _other(options, getattr(d, knob), rng)})


MOVES = [(move, block, _choice(knob, options)) for move, block, knob, options in CHOICES] + [
    ("selection recent keys", "topk_selector", _recent_keys),
    ("selection recent keys of one layer", "topk_selector", _recent_keys_of_one_layer),
    ("schedule per layer", "k_schedule", _schedule_per_layer),
]


def _valid(d: Design) -> bool:
    """What a move must keep: a schedule that is not one k everywhere (the judge refuses it)."""
    return len(set(d.schedule())) > 1


# ---------------------------------------------------------------------------------------------
# Line moves, for blocks the mutator did not write: (name, line pattern, rewrite(match, rng))


def _scaled(m, rng, factors, low, high):
    return f"{m['head']}{_number(min(max(float(m['value']) * rng.choice(factors), low), high))}{m['tail']}"


def _replaced(m, rng, options):
    return f"{m['head']}{_other([str(o) for o in options], m['value'], rng)}{m['tail']}"


def _line(constant, value=r"[0-9.e+-]+"):
    return re.compile(rf"^(?P<head>{constant} = )(?P<value>{value})(?P<tail>(  #.*)?)$")


LINE_MOVES = [
    (
        "indexer loss weight",
        _line("INDEXER_LOSS_WEIGHT"),
        lambda m, rng: _scaled(m, rng, [0.25, 0.5, 2.0, 4.0], 1e-4, 10.0),
    ),
    ("indexer heads", _line("INDEXER_HEADS", r"\d+"), lambda m, rng: _replaced(m, rng, (1, 2, 4, 8))),
    ("indexer head size", _line("INDEXER_HEAD_DIM", r"\d+"), lambda m, rng: _replaced(m, rng, (8, 16, 32, 64))),
    (
        "index score activation",
        re.compile(
            r"^(?P<head>.*\b)(?P<value>F\.relu|F\.gelu|F\.silu|F\.softplus|torch\.sigmoid)(?P<tail>\(dots\).*)$"
        ),
        lambda m, rng: _replaced(m, rng, ACTIVATIONS),
    ),
    ("schedule thresholds", _line("(?:DENSE|MIDDLE)_UNTIL", r"\d+ / \d+"), lambda m, rng: _replaced(m, rng, FRACTIONS)),
    ("schedule divisors", _line("(?:MIDDLE|LATE)_DIVISOR", r"\d+"), lambda m, rng: _replaced(m, rng, DIVISORS)),
    (
        "indexer init scale",
        re.compile(r"^(?P<head>\s+nn\.init\.normal_\(p, mean=0\.0, std=)(?P<value>[0-9.e+-]+)(?P<tail>\).*)$"),
        lambda m, rng: _scaled(m, rng, [0.5, 2.0], 1e-5, 1.0),
    ),
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


def propose_edits(code: str, rng: random.Random, max_edits: int = 2) -> list[tuple[str, str, str]]:
    """(move name, old text, new text) edits inside the blocks: structural moves on the blocks this
    module wrote, line moves on the others; at most one edit per block."""
    design, known = read_design(code)
    blocks = split_blocks(code)[1]
    line_moves = {}  # move name -> its first candidate edit, in the order of the lines (no set: hash order varies)
    for edit in _line_edits(code, [b for b in blocks if b.name not in known], rng):
        line_moves.setdefault(edit[0], edit)
    options = [(name, block) for name, block, _ in MOVES if block in known] + [(name, None) for name in line_moves]
    rng.shuffle(options)
    wanted, edits, touched = rng.randint(1, max_edits), [], set()
    for name, block in options:
        if len(edits) >= wanted:
            break
        if block is None:  # a line move in a block this module did not write
            if line_moves[name][1] not in touched:
                edits.append(line_moves[name])
                touched.add(line_moves[name][1])
            continue
        if block in touched:
            continue
        change = next(f for n, _, f in MOVES if n == name)
        for _ in range(8):  # a move may hit a schedule with one k everywhere: draw again
            new = change(design, rng)
            if _valid(new) and WRITERS[block](new) != WRITERS[block](design):
                break
        else:
            continue
        old_body = next(b.body for b in blocks if b.name == block)
        edits.append((name, old_body.rstrip("\n"), WRITERS[block](new).rstrip("\n")))
        touched.add(block)
        design = new
    return edits


def format_diff(edits) -> str:
    """OpenEvolve's SEARCH/REPLACE format, one block per edit, with a line saying why."""
    parts = [f"Offline mutator: {', '.join(name for name, _, _ in edits)}."]
    for _, old, new in edits:
        parts.append(f"<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE")
    return "\n\n".join(parts) + "\n"


CURRENT_PROGRAM = re.compile(r"# Current Program\s*```[a-z]*\n(?P<code>.*?)\n```", re.DOTALL)


def parent_program(prompt: str) -> str:
    m = CURRENT_PROGRAM.search(prompt)
    if not m:
        raise ValueError("the prompt has no '# Current Program' code block")
    return m["code"]


class OfflineMutator:
    """Answers OpenEvolve's generate_with_context with a diff; same parent and iteration, same diff."""

    def __init__(self, model_cfg=None):
        self.model = NAME
        self.base_seed = getattr(model_cfg, "random_seed", None) or 0

    async def generate_with_context(self, system_message, messages, **kwargs):
        parent = parent_program(messages[-1]["content"])
        digest = hashlib.sha256(f"{self.base_seed}:{kwargs.get('seed')}:{parent}".encode()).hexdigest()
        edits = propose_edits(parent, random.Random(int(digest[:16], 16)))
        if not edits:
            raise ValueError("no line inside the EVOLVE-BLOCKs that the offline mutator knows how to change")
        return format_diff(edits)


def offline_client(model_cfg):
    """OpenEvolve's init_client hook (module level: workers rebuild it from its import path)."""
    return OfflineMutator(model_cfg)
