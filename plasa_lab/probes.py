"""Behavioural checks of a model: what it does, not what its code says.

A check sees the model only through `forward(tokens[B,T]) -> (logits[B,T,V], selections[layers,B,T,T])`:
in the judge that is a sandboxed worker answering over a pipe (plasa_lab.judge), in tests it can
be a model in this process (`local_forward`). Each check returns None when the model behaves,
else one line that names the rule broken and where, written for the LLM that will read it.
"""

import torch

# Legitimate float noise between two forward passes that differ only after position p is 0 on
# CPU (same shapes, same kernels); the tolerance leaves room for GPU kernels, far below any leak
# that could buy perplexity.
LOGIT_TOLERANCE = 1e-4


def local_forward(model):
    """`forward` for a model in this process: eval mode, no grad, every layer's last_selection."""

    def forward(tokens):
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


def selection_violation(selections, ks):
    """Every layer's selection: causal, 1 to min(k, t+1) keys per query."""
    L, B, T, _ = selections.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=selections.device).tril()
    budget_rows = torch.arange(1, T + 1, device=selections.device)
    for i, (sel, k) in enumerate(zip(selections.bool(), ks)):
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
    base = forward(tokens)[0] if base is None else base
    for p in cut_points:
        changed = tokens.clone()
        shift = torch.randint(1, vocab_size, changed[:, p + 1 :].shape, generator=g).to(tokens.device)
        changed[:, p + 1 :] = (changed[:, p + 1 :] + shift) % vocab_size  # every suffix token differs
        moved = first_moved(forward(changed)[0], base, p)
        if moved:
            return leak_message(p, *moved)
    return None


def batch_violation(forward, tokens, vocab_size, base):
    """Changing one sequence of the batch must not move the logits of the others."""
    if tokens.shape[0] < 2:
        return None
    changed = tokens.clone()
    changed[-1] = (changed[-1] + 1) % vocab_size
    moved = (forward(changed)[0][:-1] - base[:-1]).abs().max().item()
    if not moved <= LOGIT_TOLERANCE:
        return (
            f"changing sequence {tokens.shape[0] - 1} of the batch moved the logits of the others by "
            f"{moved:.3g}: sequences must not see each other (no mixing over the batch dimension)"
        )
    return None


def state_violation(forward, tokens, vocab_size, base):
    """The same input gives the same logits whatever was seen before: no memory between calls."""
    forward((tokens + 7) % vocab_size)
    moved = (forward(tokens)[0] - base).abs().max().item()
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
    logits, selections = forward(tokens)
    return (
        interface_violation(logits, tokens, vocab_size)
        or selection_violation(selections, ks)
        or causality_violation(forward, tokens, cut_points, vocab_size, seed, base=logits)
        or batch_violation(forward, tokens, vocab_size, logits)
        or state_violation(forward, tokens, vocab_size, logits)
    )


def probe_model(model, tokens, vocab_size, seed=0):
    """`probe` on a model in this process."""
    return probe(local_forward(model), [layer.k for layer in model.plasa_layers()], tokens, vocab_size, seed)
