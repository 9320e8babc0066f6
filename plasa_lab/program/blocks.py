"""A PLASA program file: its EVOLVE-BLOCKs, and loading it as a module."""

import ast
import importlib.util
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

BLOCK_START = "# EVOLVE-BLOCK-START"
BLOCK_END = "# EVOLVE-BLOCK-END"
_module_ids = itertools.count()


@dataclass
class Block:
    name: str  # the word after EVOLVE-BLOCK-START, or block<i>
    start: int  # 0-based line index of the START marker
    end: int  # 0-based line index of the END marker
    body: str  # the lines strictly between the markers


class BlockError(ValueError):
    """The markers are missing, nested or unbalanced."""


# The line ends of Python's tokenizer. str.splitlines also ends lines at \v \f \x1c \x1d \x1e \x85
# \u2028 \u2029, which Python reads as ordinary characters (in a comment, say): a text cut by it
# would number its lines differently from the AST, and a statement could hide between the two.
_LINE = re.compile(r".*?(?:\r\n|\r|\n)|.+\Z", re.DOTALL)


def program_lines(text: str, keepends: bool = False) -> list[str]:
    """The program's lines as Python numbers them (line i + 1 is lines[i]), like str.splitlines otherwise."""
    lines = _LINE.findall(text)
    return lines if keepends else [line.rstrip("\r\n") for line in lines]


def start_marker_name(line: str) -> str | None:
    """The name a block's START marker line gives ("" when it gives none); None for any other line."""
    stripped = line.strip()
    return stripped[len(BLOCK_START) :].strip() if stripped.startswith(BLOCK_START) else None


def split_blocks(text: str) -> tuple[list[str], list[Block]]:
    """Cut a program into the text outside the blocks (one segment before, between and after
    the blocks, markers included) and the blocks. len(outside) == len(blocks) + 1."""
    lines = program_lines(text, keepends=True)
    outside, blocks, current, open_at = [], [], [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(BLOCK_START):
            if open_at is not None:
                raise BlockError(f"line {i + 1}: EVOLVE-BLOCK-START inside the block opened at line {open_at + 1}")
            current.append(line)
            outside.append("".join(current))
            current, open_at = [], i
        elif stripped.startswith(BLOCK_END):
            if open_at is None:
                raise BlockError(f"line {i + 1}: EVOLVE-BLOCK-END without a START")
            name = start_marker_name(lines[open_at]) or f"block{len(blocks)}"
            blocks.append(Block(name, open_at, i, "".join(current)))
            current, open_at = [line], None
        else:
            current.append(line)
    if open_at is not None:
        raise BlockError(f"line {open_at + 1}: EVOLVE-BLOCK-START never closed")
    outside.append("".join(current))
    return outside, blocks


def block_line_ranges(text: str) -> list[range]:
    """0-based line indices strictly inside each block."""
    return [range(b.start + 1, b.end) for b in split_blocks(text)[1]]


def load_program(path: str | Path):
    """Import a program file as a fresh module (a new name each time, so two loads never share state)."""
    path = Path(path)
    name = f"plasa_program_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# The seed's named schedules, as the expression that gives a layer's k from its relative depth
# (i + 0.5) / n. The initial program uses PROGRESSIVE_SPARSE; replay's baselines (DENSE, UNIFORM)
# and the tests make the others with `with_schedule`.
SCHEDULE_RULES = {
    "PROGRESSIVE_SPARSE": "seq_len if depth < 1 / 3 else seq_len // 4 if depth < 2 / 3 else seq_len // 2",
    "AGGRESSIVE_MIDDLE": "seq_len if depth < 1 / 4 else seq_len // 8 if depth < 3 / 4 else seq_len // 2",
    "DENSE_TO_SPARSE": (
        "seq_len if depth < 1 / 4 else seq_len // 2 if depth < 1 / 2 else seq_len // 4 "
        "if depth < 3 / 4 else seq_len // 8"
    ),
    "UNIFORM": "seq_len // 2",
    "DENSE": "seq_len",
}
SCHEDULE_BLOCK = "k_schedule"


def with_schedule(code: str, name: str) -> str:
    """The program with another named schedule: only the k_schedule block changes; its comment lines
    (what may change, what must hold) stay, its code becomes one layer_k_schedule with that rule.
    Works on any program with that block (a run's own, older initial program too); raises
    BlockError when there is none."""
    outside, blocks = split_blocks(code)
    names = [b.name for b in blocks]
    if names.count(SCHEDULE_BLOCK) != 1:
        raise BlockError(f"the program has no EVOLVE-BLOCK {SCHEDULE_BLOCK!r} to make the {name} schedule from")
    bodies = [b.body for b in blocks]
    lines = program_lines(bodies[names.index(SCHEDULE_BLOCK)], keepends=True)
    comments = lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]
    bodies[names.index(SCHEDULE_BLOCK)] = "".join(comments) + (
        f"def layer_k_schedule(n_layers, seq_len):\n"
        f'    """{name}: layer i sits at relative depth (i + 0.5) / n_layers."""\n'
        f"    ks = []\n"
        f"    for i in range(n_layers):\n"
        f"        depth = (i + 0.5) / n_layers\n"
        f"        k = {SCHEDULE_RULES[name]}\n"
        f"        ks.append(max(1, min(seq_len, k)))\n"
        f"    return ks\n"
    )
    return "".join(segment + body for segment, body in zip(outside, bodies + [""]))


def changed_blocks(base: str, other: str) -> list[str]:
    """The names of the blocks whose text differs between two programs with the same blocks."""
    (_, ours), (_, theirs) = split_blocks(base), split_blocks(other)
    if [b.name for b in ours] != [b.name for b in theirs]:
        raise BlockError("the two programs do not have the same EVOLVE-BLOCKs")
    return [a.name for a, b in zip(ours, theirs) if a.body != b.body]


def with_blocks_of(base: str, donor: str, names) -> str:
    """`base` with the named blocks taken from `donor` (an ablation: one edit of a program alone)."""
    outside, blocks = split_blocks(base)
    donated = {b.name: b.body for b in split_blocks(donor)[1]}
    bodies = [donated[b.name] if b.name in names else b.body for b in blocks]
    return "".join(segment + body for segment, body in zip(outside, bodies + [""]))


def names_defined_in(code: str, blocks: list[Block]) -> set[str]:
    """Top-level names the given blocks of a program define (functions, classes, constants).
    Raises SyntaxError when the program does not parse."""
    inside = lambda line: any(b.start < line - 1 < b.end for b in blocks)
    names = set()
    for node in ast.parse(code).body:
        if not inside(node.lineno):
            continue
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        for sub in ast.walk(node) if isinstance(node, (ast.Assign, ast.AnnAssign)) else ():
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
    return names
