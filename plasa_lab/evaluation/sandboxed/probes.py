"""Behavioural checks of a model: what it does, not what its code says.

A check sees the model only through `forward(tokens[B,T], logits=True) -> (logits[B,T,V] | None,
selections[layers,B,T,T])`: in the judge that is the trusted trunk asking a sandboxed blocks process
for the selections (plasa_lab.evaluation.sandboxed.trunk), in tests it can be a model in this process (`local_forward`).
Selections are compared exactly, logits (where the forward returns them) within a tolerance. Only the
first pass of a probe asks for logits: the judge's trunk is fixed code whose rows <= p depend only on
the tokens and selections at rows <= p, so there equal selections mean equal logits, and it skips the
LM head (most of a forward's arithmetic) on every other pass; a model in this process, whose
forward is not fixed code, answers with logits every time and has them compared. Each check
returns None when the model behaves, else one line that names the rule broken and where, written for
the LLM that will read it.
"""

import torch

# Legitimate float noise between two forward passes that differ only after position p is 0 on
# CPU (same shapes, same kernels); the tolerance leaves room for GPU kernels, far below any leak
# that could buy perplexity.
LOGIT_TOLERANCE = 1e-4


def local_forward(model):
    """`forward` for a model in this process: eval mode, no grad, every layer's last_selection."""

    def forward(tokens, logits=True):  # always logits: this model's forward is not the fixed trunk
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(tokens)
                logits = out["logits"] if isinstance(out, dict) else out
                return logits, torch.stack([layer.last_selection for layer in model.plasa_layers()])
        finally:
            model.train(was_training)

    return forward


def interface_violation(logits, tokens, vocab_size):
    B, T = tokens.shape
    if not torch.is_tensor(logits) or tuple(logits.shape) != (B, T, vocab_size) or not logits.is_floating_point():
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        return f"logits have shape {shape}: expected a float tensor of shape {(B, T, vocab_size)}"
    if not torch.isfinite(logits).all():
        return "logits contain NaN or inf on a plain forward pass: keep every score finite"
    return None


def selection_violation(selections, ks, first_layer=0):
    """Every layer's selection: causal, 1 to min(k, t+1) keys per query (`first_layer`: the number
    of the first layer given, for the message)."""
    L, B, T, _ = selections.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=selections.device).tril()
    budget_rows = torch.arange(1, T + 1, device=selections.device)
    for i, (sel, k) in enumerate(zip(selections.bool(), ks), start=first_layer):
        future = sel & ~causal
        if future.any():
            b, t, s = future.nonzero()[0].tolist()
            return f"layer {i} selects key {s} for query {t}: selection must be causal (AND it with the causal mask)"
        counts = sel.sum(-1)
        over = counts > budget_rows.clamp(max=int(k))
        if over.any():
            b, t = over.nonzero()[0].tolist()
            return (
                f"layer {i} keeps {counts[b, t].item()} keys for query {t}, over its budget "
                f"min(k={k}, t+1={t + 1}): select at most min(k, t+1) keys"
            )
        if (counts == 0).any():
            b, t = (counts == 0).nonzero()[0].tolist()
            return f"layer {i} keeps no key for query {t}: every query must attend at least one key"
    return None


def density(selections) -> float:
    """Mean over layers (and the batch) of keys attended / causal keys available."""
    L, B, T, _ = selections.shape
    return selections.float().sum().item() / (L * B * T * (T + 1) / 2)


def leak_message(p, t, moved):
    return (
        f"changing the tokens after position {p} moved the logits at position {t} by {moved:.3g}: the model "
        f"sees future tokens; position t may only use tokens <= t"
    )


def first_changed_selection(a, b, upto):
    """(layer, query) of the first query 0..upto where selections a and b ([layers, T, T] or
    [layers, B, T, T]) differ, else None."""
    differs = (a[..., : upto + 1, :] != b[..., : upto + 1, :]).any(-1)  # [layers, (B,) queries]
    if a.dim() == 4:
        differs = differs.any(1)
    if not differs.any():
        return None
    layer, t = (int(i) for i in differs.nonzero()[0])
    return layer, t


def selection_leak_message(p, layer, t):
    return (
        f"changing the tokens after position {p} changed layer {layer}'s selection at query {t}: the "
        f"selection sees future tokens; query t may only use tokens <= t"
    )


def first_moved(a, b, upto):
    """(position, amount) of the first of positions 0..upto where logits a and b differ, else None."""
    moved = (
        (a[:, : upto + 1] - b[:, : upto + 1]).abs().amax(dim=(0, 2))
        if a.dim() == 3
        else (a[: upto + 1] - b[: upto + 1]).abs().amax(dim=-1)
    )
    bad = ~(moved <= LOGIT_TOLERANCE)  # NaN counts as moved
    if bad.any():
        t = int(bad.nonzero()[0])
        return t, moved[t].item()
    return None


def causality_violation(forward, tokens, cut_points, vocab_size, seed=0, base=None):
    """Change every token after position p: the logits at positions <= p must not move."""
    g = torch.Generator().manual_seed(seed)
    base = forward(tokens) if base is None else base  # with logits
    for p in cut_points:
        changed = tokens.clone()
        shift = torch.randint(1, vocab_size, changed[:, p + 1 :].shape, generator=g).to(tokens.device)
        changed[:, p + 1 :] = (changed[:, p + 1 :] + shift) % vocab_size  # every suffix token differs
        logits, selections = forward(changed, logits=False)
        if moved := first_changed_selection(selections, base[1], p):
            return selection_leak_message(p, *moved)
        if logits is not None and (moved := first_moved(logits, base[0], p)):
            return leak_message(p, *moved)
    return None


def batch_violation(forward, tokens, vocab_size, base):
    """Changing any one sequence of the batch (each in turn) must not move the others' selections or logits."""
    B = tokens.shape[0]
    for row in range(B if B > 1 else 0):
        changed = tokens.clone()
        changed[row] = (changed[row] + 1) % vocab_size
        logits, selections = forward(changed, logits=False)
        others = [r for r in range(B) if r != row]
        same_selection = bool((selections[:, others] == base[1][:, others]).all())
        moved = 0.0 if logits is None else (logits[others] - base[0][others]).abs().max().item()
        if not (same_selection and moved <= LOGIT_TOLERANCE):
            return (
                f"changing sequence {row} of the batch changed the "
                f"{'selections' if not same_selection else f'logits (by {moved:.3g})'} of the others: sequences "
                f"must not see each other (no mixing over the batch dimension)"
            )
    return None


def state_violation(forward, tokens, vocab_size, base):
    """The same input gives the same selections and logits whatever was seen before: no memory between calls."""
    forward((tokens + 7) % vocab_size, logits=False)
    logits, selections = forward(tokens, logits=False)
    if not bool((selections == base[1]).all()):
        return "the same input gave other selections after another batch: the model must not keep state between calls"
    moved = 0.0 if logits is None else (logits - base[0]).abs().max().item()
    if not moved <= LOGIT_TOLERANCE:
        return (
            f"the same input gave logits {moved:.3g} apart after another batch: the model must not keep "
            f"state between forward calls"
        )
    return None


def probe(forward, ks, tokens, vocab_size, seed=0):
    """All behavioural checks on one batch of tokens [B, T]; None or the first rule broken."""
    T = tokens.shape[1]
    cut_points = sorted({0, T // 8, T // 3, T // 2, (3 * T) // 4, T - 2})
    base = forward(tokens)
    return (
        interface_violation(base[0], tokens, vocab_size)
        or selection_violation(base[1], ks)
        or causality_violation(forward, tokens, cut_points, vocab_size, seed, base=base)
        or batch_violation(forward, tokens, vocab_size, base)
        or state_violation(forward, tokens, vocab_size, base)
    )


def probe_model(model, tokens, vocab_size, seed=0):
    """`probe` on a model in this process."""
    return probe(local_forward(model), [layer.k for layer in model.plasa_layers()], tokens, vocab_size, seed)
