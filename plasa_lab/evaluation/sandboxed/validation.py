"""Validation by the trusted trunk: loss, accuracy and density of a trained program, and the cut checks.

The trunk (plasa_lab.evaluation.sandboxed.trunk) runs the fixed model itself; the only thing a program contributes to a
forward pass is each layer's selection, answered by one of two sandboxed blocks processes
("servers" A and B, fresh imports of the program holding the trained indexer weights). So a
forward pass here is `forward(tokens[B,T], server, rows, targets) -> ((loss, hit) of every token of
those rows | None, selections)`.

The cut checks. Validation windows also go, cut at a position p and spliced with other validation
text after p, to the *other* server, shuffled among the real windows in batches of the same shape.
Each copy's selections at queries <= p, in every layer, must equal those of its window run in full,
exactly. That is the whole causality question: the trunk is fixed code whose rows <= p depend only
on the tokens <= p and the selections' rows <= p, so equal selections mean equal logits. A selection
that depends on anything but the weights and the prefix (a peek ahead, inputs remembered from
earlier calls, other rows of the batch) differs, whichever came first, because the two servers
have different histories. In stage 2 the cuts cover every query position at least once (a peek at
one position shows only at a cut there), `rounds` times over (the profile's cuts_per_position, as
far as the split has windows: each copy needs a window of its own); stage 1 cuts at random positions.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...contract import MIN_CHECKED, VOCAB_SIZE, clamped_ppl
from . import probes

# Validation windows re-run, cut, by the other server: about 30% of them, at least MIN_CHECKED, and
# in stage 2 `rounds` per query position (rounds x (seq_len - 1) cuts: the last position has no future).
# Windows beyond the scored ones are run, unscored, where the scored ones are fewer. One cut per
# window: two copies of one window in one process would let a model that remembers inputs answer
# the shorter cut from the longer.
CHECKED_SHARE = 0.3


class Rejection(Exception):
    """The program broke a rule; the message is the one-line failure."""


@dataclass
class Item:
    window: int  # index of the validation window it comes from
    tokens: torch.Tensor  # [T]
    cut: int | None = None  # a checked copy: equal to the window up to `cut`, other text after it; -1: a repeat
    server: int = 0


def checked_windows(n_windows: int, seq_len: int = 128, rounds: int = 0) -> int:
    wanted = max(MIN_CHECKED, round(CHECKED_SHARE * n_windows), rounds * (seq_len - 1))
    return min(n_windows, wanted)


def cut_position(j: int, T: int, ks, rng: np.random.Generator) -> int:
    """A random cut: every other one anywhere, the others where some layer's selection is a choice
    (query t with t + 1 > k: a top-k leak can show only there)."""
    choice_from = min(int(k) for k in ks)
    if j % 2 and choice_from <= T - 2:
        return int(rng.integers(choice_from, T - 1))
    return int(rng.integers(T - 1))


def cut_positions(n: int, T: int, ks, rng: np.random.Generator, rounds: int) -> list[int]:
    """n cut positions: every position 0..T-2 `rounds` times (in random order), then random ones."""
    first = [int(p) for _ in range(rounds) for p in rng.permutation(T - 1)]
    return (first + [cut_position(j, T, ks, rng) for j in range(max(0, n - len(first)))])[:n]


def plan_validation(windows: torch.Tensor, batch_size: int, ks, rng: np.random.Generator, rounds: int = 0):
    """The items each of the two servers gets, shuffled: every window once (half of them, at random,
    on each server), checked copies on the other server than their window, padding (repeats of the
    server's own windows) so that every batch has batch_size rows.

    A window must never reach the server that runs its copies, not even as padding: a model that
    remembers inputs would answer the copies from it and hide a peek ahead."""
    N, T = windows.shape[0], windows.shape[1] - 1
    if N < 2:
        raise ValueError("validation needs at least two windows (one on each server)")
    n_copies = checked_windows(N, T, rounds)
    if n_copies < rounds * (T - 1):
        raise ValueError(f"cutting every position {rounds} times needs {rounds * (T - 1)} windows, got {N}")
    inputs = windows[:, :-1]
    servers = (np.arange(N) % 2)[rng.permutation(N)]
    reals = [Item(i, inputs[i], server=int(servers[i])) for i in range(N)]
    copies = []
    chosen = rng.choice(N, size=n_copies, replace=False)
    for i, p in zip(chosen, cut_positions(n_copies, T, ks, rng, rounds)):
        i = int(i)
        donor = int(rng.choice([j for j in range(N) if j != i]))
        tokens = inputs[i].clone()
        tokens[p + 1 :] = inputs[donor][p + 1 :]
        same = tokens[p + 1 :] == inputs[i][p + 1 :]  # the splice must change every token after the cut
        tokens[p + 1 :][same] = (tokens[p + 1 :][same] + 1 + int(rng.integers(VOCAB_SIZE - 1))) % VOCAB_SIZE
        copies.append(Item(i, tokens, cut=p, server=1 - reals[i].server))
    per_server = [[item for item in reals + copies if item.server == s] for s in (0, 1)]
    for s, items in enumerate(per_server):
        own = [item for item in items if item.cut is None]
        while len(items) % batch_size:
            pad = own[int(rng.integers(len(own)))]
            items.append(Item(pad.window, pad.tokens, cut=-1, server=s))  # a repeat: must match in full
        rng.shuffle(items)
    return [[items[i : i + batch_size] for i in range(0, len(items), batch_size)] for items in per_server]


def compare(copy_selections, window_selections, upto: int, item: Item):
    """A copy's selections [layers, T, T] at queries <= upto must be its window's, exactly."""
    moved = probes.first_changed_selection(copy_selections, window_selections, upto)
    if moved:
        layer, t = moved
        what = (
            f"a copy of a validation window cut after position {upto} and run by the other process"
            if item.cut != -1
            else "the same validation window run twice by one process"
        )
        raise Rejection(
            f"during validation: {what} selected other keys in layer {layer} at query {t}: "
            + (
                "the selection sees future tokens; query t may only use tokens <= t"
                if item.cut != -1
                else "the model must not keep state between forward calls"
            )
        )


def validate(forward, windows: torch.Tensor, n_scored: int, batch_size: int, ks, rng, rounds: int = 0) -> dict:
    """Loss, accuracy and density over every predicted token of the first n_scored windows, computed
    here from the trunk's logits; every checked copy and repeat must reproduce its window's
    selections up to its cut; every batch's selections must be causal and within budget."""
    batches = plan_validation(windows, batch_size, ks, rng, rounds)
    targets = windows[:, 1:]
    T = targets.shape[1]
    full = {}  # window -> its selections in full (only for windows that copies compare against)
    pending = {}  # window -> [(item, selections)] copies that came before their window
    checked = {item.window for per in batches for batch in per for item in batch if item.cut is not None}
    loss_sums, correct, densities = [], 0, []
    for s, per_server in enumerate(batches):
        for batch in per_server:
            rows = [row for row, item in enumerate(batch) if item.cut is None and item.window < n_scored]  # scored
            row_targets = targets[[batch[row].window for row in rows]]
            scored, selections = forward(torch.stack([item.tokens for item in batch]), s, rows, row_targets)
            if problem := probes.selection_violation(selections, ks):
                raise Rejection(f"during validation: {problem}")
            if rows:
                losses, hits = scored
                loss_sums += losses.double().sum(-1).tolist()
                correct += int(hits.sum())
                densities += [probes.density(selections[:, row : row + 1]) for row in rows]
            for row, item in enumerate(batch):
                mine = selections[:, row]
                if item.cut is None:
                    if item.window in checked:
                        full[item.window] = mine.clone()
                        for copy, copy_selections in pending.pop(item.window, []):
                            compare(copy_selections, mine, T - 1 if copy.cut == -1 else copy.cut, copy)
                else:
                    upto = T - 1 if item.cut == -1 else item.cut
                    if item.window in full:
                        compare(mine, full[item.window], upto, item)
                    else:
                        pending.setdefault(item.window, []).append((item, mine.clone()))
    count = targets[:n_scored].numel()
    val_loss = math.fsum(loss_sums) / count
    if not math.isfinite(val_loss):
        raise Rejection("the logits are so extreme that the validation loss overflows: keep the scores in range")
    return dict(
        val_loss=val_loss,
        val_ppl=clamped_ppl(val_loss),
        val_acc=correct / count,
        density=math.fsum(densities) / len(densities),
    )


# Tokens whose logits are made and scored at once: 64 x 50257 float32 (13 MB) stays in a CPU's cache
# for the max and exp passes. 1024 tokens here (2 threads): 200 ms in one piece, 75 ms in chunks of
# 64, 206 ms in chunks of 128.
SCORE_CHUNK = 64


def head_losses(hidden: torch.Tensor, lm_head, targets: torch.Tensor, chunk: int = SCORE_CHUNK):
    """`token_losses` of lm_head(hidden) (hidden [..., T, C], targets [..., T]), the logits made
    `chunk` tokens at a time and never held whole."""
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    parts = [
        token_losses(lm_head(flat_hidden[i : i + chunk]).float(), flat_targets[i : i + chunk])
        for i in range(0, len(flat_targets), chunk)
    ]
    return tuple(torch.cat(part).view(targets.shape) for part in zip(*parts))


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and hit (argmax == target) of every token: logits [..., T, V], targets [..., T].
    One pass of max and one of exp over the vocabulary in float32 (sum the losses in float64):
    F.cross_entropy on float64 logits plus an argmax took 2.7x as long here for differences below 1e-5
    per token, and the scored windows' LM head outputs are most of validation's arithmetic."""
    top, predicted = logits.max(-1)  # the first maximal index, as argmax
    log_total = top + (logits - top.unsqueeze(-1)).exp_().sum(-1).log_()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return log_total - picked, predicted == targets
