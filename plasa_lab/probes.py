"""Behavioural checks of a built model: what it does, not what its code says.

Each check returns None when the model behaves, else one line that names the rule broken and
where, written for the LLM that will read it. All run in eval mode (dropout off), without grad.
"""

import torch

# Legitimate float noise between two forward passes that differ only after position p is 0 on
# CPU (same shapes, same kernels); the tolerance leaves room for GPU kernels, far below any leak
# that could buy perplexity.
LOGIT_TOLERANCE = 1e-4


def _forward_logits(model, tokens):
    out = model(tokens)
    if not isinstance(out, dict) or "logits" not in out:
        raise ProbeFailure(f"model(input_ids) returned {type(out).__name__}: it must return a dict with 'logits'")
    return out["logits"]


class ProbeFailure(Exception):
    """A rule broken, as one line."""


def interface_violation(model, tokens, vocab_size):
    logits = _forward_logits(model, tokens)
    B, T = tokens.shape
    if not torch.is_tensor(logits) or tuple(logits.shape) != (B, T, vocab_size) or not logits.is_floating_point():
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        return f"logits have shape {shape}: expected a float tensor of shape {(B, T, vocab_size)}"
    if not torch.isfinite(logits).all():
        return "logits contain NaN or inf on a plain forward pass: keep every score finite"
    return None


def selection_violation(model, tokens):
    """Every layer's last_selection: BoolTensor[B,T,T], causal, 1 to min(k, t+1) keys per query."""
    _forward_logits(model, tokens)
    B, T = tokens.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    budget_rows = torch.arange(1, T + 1, device=tokens.device)
    for i, layer in enumerate(model.plasa_layers()):
        sel = getattr(layer, "last_selection", None)
        if not torch.is_tensor(sel) or sel.dtype != torch.bool or tuple(sel.shape) != (B, T, T):
            got = f"{sel.dtype} {tuple(sel.shape)}" if torch.is_tensor(sel) else type(sel).__name__
            return f"layer {i}: last_selection is {got}, expected a BoolTensor of shape {(B, T, T)}"
        future = sel & ~causal
        if future.any():
            b, t, s = future.nonzero()[0].tolist()
            return f"layer {i} selects key {s} for query {t}: selection must be causal (AND it with the causal mask)"
        counts = sel.sum(-1)
        allowed = budget_rows.clamp(max=int(layer.k))
        over = counts > allowed
        if over.any():
            b, t = over.nonzero()[0].tolist()
            return (f"layer {i} keeps {counts[b, t].item()} keys for query {t}, over its budget "
                    f"min(k={layer.k}, t+1={t + 1}): select at most min(k, t+1) keys")
        if (counts == 0).any():
            b, t = (counts == 0).nonzero()[0].tolist()
            return f"layer {i} keeps no key for query {t}: every query must attend at least one key"
    return None


def causality_violation(model, tokens, cut_points, vocab_size, seed=0, base=None):
    """Change every token after position p: the logits at positions <= p must not move (from
    `base`, the logits of `tokens` if already computed, e.g. the ones validation just scored)."""
    g = torch.Generator().manual_seed(seed)
    base = _forward_logits(model, tokens) if base is None else base
    for p in cut_points:
        changed = tokens.clone()
        shift = torch.randint(1, vocab_size, changed[:, p + 1:].shape, generator=g).to(tokens.device)
        changed[:, p + 1:] = (changed[:, p + 1:] + shift) % vocab_size  # every suffix token differs
        moved = (_forward_logits(model, changed)[:, : p + 1] - base[:, : p + 1]).abs().amax(dim=(0, 2))
        if not (moved <= LOGIT_TOLERANCE).all():  # NaN counts as moved
            t = int((~(moved <= LOGIT_TOLERANCE)).nonzero()[0])
            return (f"changing the tokens after position {p} moved the logits at position {t} by "
                    f"{moved[t].item():.3g}: the model sees future tokens; position t may only use tokens <= t")
    return None


def batch_violation(model, tokens, vocab_size):
    """Changing one sequence of the batch must not move the logits of the others."""
    if tokens.shape[0] < 2:
        return None
    base = _forward_logits(model, tokens)
    changed = tokens.clone()
    changed[-1] = (changed[-1] + 1) % vocab_size
    moved = (_forward_logits(model, changed)[:-1] - base[:-1]).abs().max().item()
    if not moved <= LOGIT_TOLERANCE:
        return (f"changing sequence {tokens.shape[0] - 1} of the batch moved the logits of the others by "
                f"{moved:.3g}: sequences must not see each other (no mixing over the batch dimension)")
    return None


def state_violation(model, tokens, vocab_size):
    """The same input gives the same logits whatever was seen before: no memory between calls."""
    first = _forward_logits(model, tokens)
    _forward_logits(model, (tokens + 7) % vocab_size)
    moved = (_forward_logits(model, tokens) - first).abs().max().item()
    if not moved <= LOGIT_TOLERANCE:
        return (f"the same input gave logits {moved:.3g} apart after another batch: the model must not keep "
                f"state between forward calls")
    return None


def probe_model(model, tokens, vocab_size, seed=0):
    """All behavioural checks on one batch of tokens [B, T]; None or the first rule broken."""
    T = tokens.shape[1]
    cut_points = sorted({0, T // 8, T // 3, T // 2, (3 * T) // 4, T - 2})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return (interface_violation(model, tokens, vocab_size)
                    or selection_violation(model, tokens)
                    or causality_violation(model, tokens, cut_points, vocab_size, seed)
                    or batch_violation(model, tokens, vocab_size)
                    or state_violation(model, tokens, vocab_size))
    except ProbeFailure as e:
        return str(e)
    finally:
        model.train(was_training)
