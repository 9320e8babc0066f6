"""The offline mutator: a seeded, LLM-free search operator that OpenEvolve calls like an LLM.

It reads the parent program from the prompt and answers with one or two SEARCH/REPLACE edits
inside the EVOLVE-BLOCKs, each one a small move among sensible alternatives: the indexer loss
weight, the indexer's heads and head size, the activation of the index score, a divisor or depth
threshold of the schedule rule, the indexer's init scale. It is the
no-LLM baseline of the system and lets the whole pipeline run without a network.

Plugged in through OpenEvolve's `init_client` (see `offline_client`), which must be a
module-level function so that worker processes can rebuild it.
"""

import hashlib
import random
import re

from .program import split_blocks

ACTIVATIONS = ("F.relu", "F.gelu", "F.silu", "F.softplus", "torch.sigmoid")
FRACTIONS = ("1 / 8", "1 / 4", "1 / 3", "1 / 2", "2 / 3", "3 / 4", "7 / 8")
DIVISORS = (1, 2, 4, 8, 16)
NAME = "offline-mutator"


def _number(x: float) -> str:
    return f"{x:.4g}" if "e" not in f"{x:.4g}" else f"{x:.2e}"


# Each operator: (name, line pattern, rewrite(match, rng) -> new line or None)
def _loss_weight(m, rng):
    new = float(m["value"]) * rng.choice([0.25, 0.5, 2.0, 4.0])
    return f"{m['head']}{_number(min(max(new, 1e-4), 10.0))}{m['tail']}"


def _choice_other(m, rng, options):
    return f"{m['head']}{rng.choice([o for o in options if o != int(m['value'])])}{m['tail']}"


def _activation(m, rng):
    return f"{m['head']}{rng.choice([a for a in ACTIVATIONS if a != m['act']])}{m['tail']}"


def _schedule_rule(m, rng):
    """Change one divisor (seq_len // n) or one depth threshold (a / b) of the schedule rule."""
    line = m.string
    spots = [("div", x) for x in re.finditer(r"seq_len // (\d+)", line)] + [
        ("frac", x) for x in re.finditer(r"\d+ / \d+", line)
    ]
    kind, spot = rng.choice(spots)
    if kind == "div":
        new = f"seq_len // {rng.choice([d for d in DIVISORS if d != int(spot[1])])}"
    else:
        new = rng.choice([f for f in FRACTIONS if f != spot[0]])
    return line[: spot.start()] + new + line[spot.end() :]


def _init_std(m, rng):
    return f"{m['head']}{_number(float(m['value']) * rng.choice([0.5, 2.0]))}{m['tail']}"


OPERATORS = [
    (
        "indexer loss weight",
        re.compile(r"^(?P<head>INDEXER_LOSS_WEIGHT = )(?P<value>[0-9.e+-]+)(?P<tail>.*)$"),
        _loss_weight,
    ),
    (
        "indexer heads",
        re.compile(r"^(?P<head>INDEXER_HEADS = )(?P<value>\d+)(?P<tail>.*)$"),
        lambda m, rng: _choice_other(m, rng, (1, 2, 4, 8)),
    ),
    (
        "indexer head size",
        re.compile(r"^(?P<head>INDEXER_HEAD_DIM = )(?P<value>\d+)(?P<tail>.*)$"),
        lambda m, rng: _choice_other(m, rng, (8, 16, 32, 64)),
    ),
    (
        "index score activation",
        re.compile(r"^(?P<head>.*\b)(?P<act>F\.relu|F\.gelu|F\.silu|F\.softplus|torch\.sigmoid)(?P<tail>\(dots\).*)$"),
        _activation,
    ),
    (
        "schedule rule",
        re.compile(r"^\s+k = seq_len( if depth < \d+ / \d+ else seq_len // \d+)+( if .*)?$"),
        _schedule_rule,
    ),
    (
        "indexer init scale",
        re.compile(r"^(?P<head>\s+nn\.init\.normal_\(p, mean=0\.0, std=)(?P<value>[0-9.e+-]+)(?P<tail>\).*)$"),
        _init_std,
    ),
]


def propose_edits(code: str, rng: random.Random, max_edits: int = 2) -> list[tuple[str, str, str]]:
    """(operator name, old line, new line) edits of lines inside the blocks, each old line unique
    in the program (OpenEvolve replaces the first match)."""
    lines = code.splitlines()
    inside = [i for b in split_blocks(code)[1] for i in range(b.start + 1, b.end)]
    candidates = []
    for i in inside:
        for name, pattern, rewrite in OPERATORS:
            m = pattern.match(lines[i])
            if m and lines.count(lines[i]) == 1:
                candidates.append((name, i, m, rewrite))
    rng.shuffle(candidates)
    wanted, edits = rng.randint(1, max_edits), []
    for name, i, m, rewrite in candidates:
        new = rewrite(m, rng)
        if new and new != lines[i] and len(edits) < wanted:
            edits.append((name, lines[i], new))
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
