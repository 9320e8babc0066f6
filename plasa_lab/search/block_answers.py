"""Block answers (`--answer block`): the model rewrites one named EVOLVE-BLOCK in full, and the LLM
client turns its answer into the SEARCH/REPLACE edit OpenEvolve applies.

A small model copies a SEARCH badly (a dropped blank line, a changed comment and the edit matches
nothing); asked for a whole block it only has to write code. The block is the one the prompt's
focus names (`focus_block`); the prompt's answer format says exactly what to return
(`block_prompt`); the answer is read (`read_block`): one fenced python block holding the block's
new body, which must parse in place, may hold no EVOLVE-BLOCK marker, and may leave no name the
program reads undefined (a block rewritten without a constant the rest still reads would only fail
its training with a NameError). A refusal is one printable line the client sends back to the model
once, within the same call, in a short request of its own (`retry_prompt`). A diff answer that
gives whole blocks instead of SEARCH/REPLACE is read the same way (`blocks_in_diff_answer`).

Nothing here widens what a child may be: the edit replaces the body of one block of the parent,
and the child then meets the same static checks (the text outside the blocks unchanged, markers
included) and the same judge as any other.
"""

import builtins
import re
import symtable

from ..program.blocks import (
    BLOCK_END,
    BLOCK_START,
    Block,
    BlockError,
    names_defined_in,
    program_lines,
    split_blocks,
    start_marker_name,
)
from ..util import one_line

ANSWER_FORMATS = ("diff", "block")
RETRIES = 1  # a refused block is answered once with the reason, within the same call
FENCE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)```", re.DOTALL)
OPENING_FENCE = re.compile(r"\A\s*```[\w+-]*[ \t]*\n")  # of an answer cut before its closing fence
TASK = "# Task"
ANSWER_FORMAT = "# Answer format"
DIFF_TASK_SENTENCE = "Propose one concrete idea of your own in one or two sentences, then make exactly that change."
BLOCK_TASK_SENTENCE = "Make one concrete change of your own; a comment in the block may say what it is."


MODULE_NAMES = set(dir(builtins)) | {"__name__", "__file__", "__doc__", "__spec__", "__builtins__"}


class BlockRefused(ValueError):
    """A block answer that cannot become an edit; the message is the one line the model is told."""


def _defined_names(code: str, block: Block) -> set[str]:
    """The block's name and the top-level names it defines (functions, classes, constants)."""
    try:
        return {block.name} | names_defined_in(code, [block])
    except SyntaxError:
        return {block.name}


def focus_block(user: str, parent: str) -> Block | None:
    """The block the prompt's task is about: the one whose name, or a name it defines, the task
    mentions first (the focus: "work on the selection rule in select_topk"); when it names none, a
    block chosen by the prompt's length. None when the parent has no blocks."""
    try:
        blocks = split_blocks(parent)[1]
    except BlockError:
        return None
    if not blocks:
        return None
    task = user[user.rfind(TASK) :] if TASK in user else ""
    first = {}
    for block in blocks:
        for name in _defined_names(parent, block):
            if found := re.search(rf"\b{re.escape(name)}\b", task):
                first[block.name] = min(first.get(block.name, len(task)), found.start())
    if first:
        name = min(first, key=first.get)
        return next(b for b in blocks if b.name == name)
    return blocks[len(user) % len(blocks)]


def block_prompt(user: str, name: str) -> str:
    """The user message with its answer format asking for the block `name` in full (everything from
    the "# Answer format" heading on is replaced; a message without one gets it appended)."""
    head = user[: user.rfind(ANSWER_FORMAT)] if ANSWER_FORMAT in user else user.rstrip() + "\n\n"
    head = head.replace(DIFF_TASK_SENTENCE, BLOCK_TASK_SENTENCE)
    return head + (
        f"{ANSWER_FORMAT}\n"
        f"Rewrite the EVOLVE-BLOCK named {name} in full; the other blocks stay as they are. Return exactly "
        f"one fenced python code block holding the whole new body of {name}: every line between its "
        f"`{BLOCK_START} {name}` line and its `{BLOCK_END}` line (those two marker lines left out), the "
        "lines you keep copied as they are. Nothing else: no other code block, no SEARCH/REPLACE markers.\n"
    )


def _body_of(answer: str, name: str) -> str:
    """The new body an answer gives: its one fenced block (the longest of several), else the whole
    answer (an opening fence that was never closed left out); a START marker of the block on its
    first line and an END marker on its last (`# EVOLVE-BLOCK-END k_schedule` too) dropped."""
    fences = FENCE.findall(answer)
    text = max(fences, key=len) if fences else OPENING_FENCE.sub("", answer, count=1)
    lines = text.strip("\n").split("\n")
    if lines and start_marker_name(lines[0]) == name:
        lines = lines[1:]
    if lines and lines[-1].split()[:2] == BLOCK_END.split():
        lines = lines[:-1]
    return "\n".join(lines).rstrip() + "\n"


def blocks_in_diff_answer(answer: str, parent: str) -> str | None:
    """The edit a diff answer means when it holds no SEARCH/REPLACE but whole blocks instead: each
    fence whose first line is a parent block's START marker, read as a block answer (a small model
    asked for diffs answered so in 6 of 12 responses); refused ones left out. None when none is read."""
    if "<<<<<<< SEARCH" in answer:
        return None
    try:
        names = {b.name for b in split_blocks(parent)[1]}
    except BlockError:
        return None
    edits = []
    for fence in FENCE.findall(answer):
        if (name := start_marker_name(fence.split("\n", 1)[0])) in names:
            try:
                edits.append(read_block(f"```python\n{fence}```", parent, name))
            except BlockRefused:
                continue
    return "".join(edits) or None


def retry_prompt(parent: str, name: str, answer: str, reason: str) -> str:
    """The user message of a refused answer's retry: the block as the parent has it, the body the
    model gave, the reason, and the answer format again. Blocks, not the whole first prompt with the
    answer appended: a retry then fits wherever the first request fitted (a small local server's
    context once overflowed on a retry that resent everything)."""
    block = next(b for b in split_blocks(parent)[1] if b.name == name)
    return (
        f"You were asked to rewrite the EVOLVE-BLOCK named {name} of a program, whose body is now:\n"
        f"```python\n{block.body.rstrip()}\n```\n\nYour answer gave this body:\n```python\n"
        f"{_body_of(answer, name).rstrip()}\n```\n\nIt was refused: {reason}\n\n"
        f"{ANSWER_FORMAT}\nReturn exactly one fenced python code block holding the whole corrected body of "
        f"{name} (the two marker lines left out). Nothing else.\n"
    )


def unresolved_names(code: str) -> set[str]:
    """The global names a program reads (at top level or in any function, class or lambda) that it
    never defines (by assignment, def, class, import or a `global` declaration that assigns) and that
    are not builtins: each a NameError waiting to happen. Raises SyntaxError."""
    defined, read, tables = set(), set(), [symtable.symtable(code, "<program>", "exec")]
    while tables:
        table = tables.pop()
        tables += table.get_children()
        for symbol in table.get_symbols():
            if table.get_type() == "module" and (symbol.is_assigned() or symbol.is_imported()):
                defined.add(symbol.get_name())
            if symbol.is_declared_global() and symbol.is_assigned():
                defined.add(symbol.get_name())
            if symbol.is_global() and symbol.is_referenced():
                read.add(symbol.get_name())
    return read - defined - MODULE_NAMES


def read_block(answer: str, parent: str, name: str) -> str:
    """The SEARCH/REPLACE edit (the block's START marker and its parent body, then the marker and the
    new body) that a block answer means; BlockRefused with one line for the model when it means none."""
    try:
        outside, blocks = split_blocks(parent)
        block = next(b for b in blocks if b.name == name)
    except (BlockError, StopIteration):
        raise BlockRefused(f"the parent has no EVOLVE-BLOCK named {name}") from None
    body = _body_of(answer, name)
    if not body.strip():
        raise BlockRefused(f"the answer holds no code: give the whole body of {name} in one fenced python block")
    if any("EVOLVE-BLOCK" in line for line in body.split("\n")):
        raise BlockRefused(f"the body of {name} may hold no EVOLVE-BLOCK marker: give only the lines between them")
    if body.strip() == block.body.strip():
        raise BlockRefused(f"the body of {name} is unchanged: make one concrete change")
    bodies = [body if b is block else b.body for b in blocks]
    child = "".join(o + b for o, b in zip(outside, bodies)) + outside[-1]
    try:
        unresolved = unresolved_names(child)  # symtable parses it, and refuses what only compile() would
    except SyntaxError as e:
        line = (e.lineno or 0) - block.start - 1
        where = f"line {line} of the block" if 0 < line <= body.count("\n") else "the block"
        raise BlockRefused(one_line(f"the block does not parse: {e.msg} at {where}; fix it and answer again")) from None
    if "import *" not in child and (missing := sorted(unresolved - unresolved_names(parent))):
        names = ", ".join(missing[:5])
        why = f"the program would read {names}, which nothing defines (a NameError)"
        raise BlockRefused(one_line(f"{why}: define it in {name} or stop reading it"))
    start = program_lines(parent)[block.start]  # the parent's own marker line
    return (
        f"Rewrote the EVOLVE-BLOCK {name} in full.\n<<<<<<< SEARCH\n{start}\n{block.body.rstrip()}\n=======\n"
        f"{start}\n{body.rstrip()}\n>>>>>>> REPLACE\n"
    )
