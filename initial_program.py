"""PLASA: Per-Layer Adaptive Sparse Attention, a small causal language model.

Read top to bottom: config, the four EVOLVE-BLOCKs (Lightning Indexer, top-k selector,
per-layer k schedule, indexer training signal), then the fixed model and a short training run.

Each attention layer scores every past key with a cheap Lightning Indexer
(DeepSeek-V3.2 style), keeps the top-k keys per query (k from a per-layer schedule: dense
early, sparse middle, moderate late) and runs ordinary scaled dot-product attention with RoPE
over the kept keys only. The indexer reads the hidden states detached and gets no gradient through
top-k: it learns only from an auxiliary KL loss that pulls its scores towards the main attention
distribution, and the trunk only from the language-modelling loss (each clipped on its own).

Only the EVOLVE-BLOCK regions may change; the evaluator rejects a program whose text outside
them differs from this file, and checks causality by behaviour (a leak scores 0).

Run alone: `python initial_program.py [--tokens FILE.bin] [--steps N]` trains briefly on
uint16 token ids (or on built-in synthetic tokens) and prints its metrics as JSON.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_CONFIG = dict(n_layers=4, d_model=128, n_heads=4, seq_len=128, vocab_size=49152, dropout=0.1)
FFN_HIDDEN = 768  # SwiGLU hidden size: 4 layers then hold ~1.53M non-embedding parameters


# EVOLVE-BLOCK-START lightning_indexer
# May change: how the indexer scores keys (heads, dims, activation, weighting, positions), per layer.
# Must hold: forward(x[B,T,C]) -> scores[B,T,T] where scores[b,t,s] uses only x[b,:t+1] and x[b,s];
# the indexers of all layers stay within the 2.0M budget with the fixed model's 1.53M (4 bytes a value).
INDEXER_HEADS = 4  # H_I query heads
INDEXER_HEAD_DIM = 32  # d_I, also the size of the one key shared by all heads


class LightningIndexer(nn.Module):
    """I[t,s] = sum_j w[t,j] * ReLU(q[t,j] . k[s]): H_I query heads, one key shared by all heads.
    `layer` (0 = first) is the attention layer this indexer serves: every layer may differ."""

    def __init__(self, d_model, layer):
        super().__init__()
        self.n_heads, self.head_dim = INDEXER_HEADS, INDEXER_HEAD_DIM
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.head_dim, bias=False)
        self.w_proj = nn.Linear(d_model, self.n_heads, bias=False)

    def components(self, x):
        """q[B,T,H,D], k[B,T,D], w[B,T,H]; the 1/sqrt scales live here so the score is the bare formula."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim) * self.head_dim**-0.5
        k = self.k_proj(x)
        w = self.w_proj(x) * self.n_heads**-0.5
        return q, k, w

    def forward(self, x):
        q, k, w = self.components(x)
        dots = torch.einsum("bthd,bsd->bhts", q, k)
        return torch.einsum("bth,bhts->bts", w, F.relu(dots))


# EVOLVE-BLOCK-END


# EVOLVE-BLOCK-START topk_selector
# May change: which keys each query keeps, given index scores and the layer's budget k.
# Must hold: returns BoolTensor[B,T,T]; row t keeps between 1 and min(k, t+1) keys, all with s <= t.
def select_topk(scores, k, layer):
    """Keep the min(k, t+1) highest-scoring keys s <= t of every query t (the same rule in every layer)."""
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    if k >= T:
        return causal.expand_as(scores)
    candidates = scores.masked_fill(~causal, float("-inf"))
    top = candidates.topk(k, dim=-1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    # Rows t < k-1 have fewer than k past keys, so top-k also returns future (-inf) slots:
    # the AND with the causal mask is what removes them, not the -inf.
    return selected & causal


# EVOLVE-BLOCK-END


# EVOLVE-BLOCK-START k_schedule
# May change: how many keys each layer keeps (the per-layer sparsity schedule).
# Must hold: layer_k_schedule(n_layers, seq_len) -> list of n_layers ints in [1, seq_len], not all equal.
DENSE_UNTIL = 1 / 3  # layers at relative depth below this attend to every past key
MIDDLE_UNTIL = 2 / 3  # then seq_len // MIDDLE_DIVISOR keys up to this depth, seq_len // LATE_DIVISOR after it
MIDDLE_DIVISOR = 4
LATE_DIVISOR = 2


def layer_k_schedule(n_layers, seq_len):
    """PROGRESSIVE_SPARSE: dense early, L/4 in the middle, L/2 late; layer i sits at relative depth
    (i + 0.5) / n_layers. For 4 layers and L = 128: 128, 32, 32, 64."""
    ks = []
    for i in range(n_layers):
        depth = (i + 0.5) / n_layers
        if depth < DENSE_UNTIL:
            k = seq_len
        elif depth < MIDDLE_UNTIL:
            k = seq_len // MIDDLE_DIVISOR
        else:
            k = seq_len // LATE_DIVISOR
        ks.append(max(1, min(seq_len, k)))
    return ks


# EVOLVE-BLOCK-END


# EVOLVE-BLOCK-START indexer_training
# May change: the indexer's training signal, its weight and the indexer's initialisation.
# Must hold: indexer_aux_loss returns a finite scalar; it trains the indexer only (its input is detached).
INDEXER_LOSS_WEIGHT = 0.1  # small next to the LM loss: the indexer only has to rank keys


def indexer_aux_loss(attn_probs, scores, selected, layer):
    """DeepSeek-V3.2's indexer loss: KL(p || softmax(I)) over each query's selected keys.

    attn_probs[B,H,T,T] is the main attention (already detached), summed over heads and
    renormalised into the target p; scores[B,T,T] are the index scores; selected[B,T,T] the keys
    kept; `layer` the attention layer (0 = first).
    """
    target = attn_probs.sum(dim=1)
    target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    log_q = scores.masked_fill(~selected, float("-inf")).log_softmax(dim=-1).masked_fill(~selected, 0.0)
    kl = target * (target.clamp_min(1e-9).log() - log_q)  # zero outside the selection, where p = 0
    return INDEXER_LOSS_WEIGHT * kl.sum(dim=-1).mean()


def init_indexer(indexer, layer):
    for p in indexer.parameters():
        nn.init.normal_(p, mean=0.0, std=0.02)


# EVOLVE-BLOCK-END


# ---------------------------------------------------------------------------------------------
# Fixed model: everything below is outside the EVOLVE-BLOCKs and must stay as it is.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len, head_dim, base=10000.0):
    inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of x[B,H,T,D] by position-dependent angles (half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class PLASAAttention(nn.Module):
    """Attention of each query over the keys its selector keeps, and nothing else."""

    def __init__(self, d_model, n_heads, k, dropout, layer):
        super().__init__()
        self.n_heads, self.head_dim, self.k, self.layer = n_heads, d_model // n_heads, k, layer
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.indexer = LightningIndexer(d_model, layer)
        self.last_selection = None

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        # The indexer sees the hidden states detached from the trunk, as DeepSeek-V3.2's does: it learns
        # only from its own loss, and nothing it is handed leads back to the trunk's weights or graph.
        scores = self.indexer(x.detach())
        # A private copy: no block keeps a handle on the mask attention uses and reports (a selector
        # could otherwise rewrite it after attention ran, so the report would not be what was used).
        selected = torch.clone(select_topk(scores, self.k, self.layer))
        self.last_selection = selected.detach()
        att = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        att = att.masked_fill(~selected[:, None], float("-inf")).softmax(dim=-1)
        y = (self.dropout(att) @ v).transpose(1, 2).reshape(B, T, C)
        aux = indexer_aux_loss(att.detach(), scores, selected, self.layer) if self.training else None
        return self.proj(y), aux


class SwiGLU(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, k, dropout, layer):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = PLASAAttention(d_model, n_heads, k, dropout, layer)
        self.ffn_norm = RMSNorm(d_model)
        self.ffn = SwiGLU(d_model, FFN_HIDDEN)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cos, sin):
        a, aux = self.attn(self.attn_norm(x), cos, sin)
        x = x + self.dropout(a)
        return x + self.dropout(self.ffn(self.ffn_norm(x))), aux


class PLASAModel(nn.Module):
    def __init__(self, vocab_size, n_layers, d_model, n_heads, seq_len, dropout):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        ks = layer_k_schedule(n_layers, seq_len)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, k, dropout, layer) for layer, k in enumerate(ks))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)  # untied from the embedding
        cos, sin = rope_tables(seq_len, d_model // n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for layer, block in enumerate(self.blocks):
            # GPT-2's scaled init of the projections that write into the residual stream
            for p in (block.attn.proj.weight, block.ffn.down.weight):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
            init_indexer(block.attn.indexer, layer)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def plasa_layers(self):
        return [block.attn for block in self.blocks]

    def forward(self, input_ids):
        x = self.embed(input_ids)
        aux_losses = []
        for block in self.blocks:
            x, aux = block(x, self.rope_cos, self.rope_sin)
            if aux is not None:
                aux_losses.append(aux)
        out = {"logits": self.lm_head(self.norm(x))}
        if aux_losses:
            out["aux_loss"] = torch.stack(aux_losses).sum()
        return out


def build_model(vocab_size: int = 49152) -> nn.Module:
    cfg = {**MODEL_CONFIG, "vocab_size": vocab_size}
    return PLASAModel(
        cfg["vocab_size"], cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["seq_len"], cfg["dropout"]
    )


# ---------------------------------------------------------------------------------------------
# Standalone run: a short training on given or synthetic tokens. The evaluator does not use
# this; it trains every program with its own trusted loop.


def synthetic_tokens(n, vocab_size, seed=0):
    """A repeating random 'text' with noise: learnable structure, so the loss visibly falls."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab_size, (509,), generator=g)
    tokens = phrase.repeat(n // len(phrase) + 1)[:n]
    noise = torch.rand(n, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab_size, (n,), generator=g), tokens)


def load_tokens(path):
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint16).long()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", help="raw uint16 token ids (e.g. a token cache's train.bin)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    L, V = MODEL_CONFIG["seq_len"], MODEL_CONFIG["vocab_size"]
    tokens = load_tokens(args.tokens) if args.tokens else synthetic_tokens(200_000, V)
    if len(tokens) < 2 * (L + 1):
        parser.error(f"{args.tokens}: {len(tokens)} tokens, need at least {2 * (L + 1)}")
    split = int(0.9 * len(tokens))
    train, val = tokens[:split], tokens[split:]
    model = build_model(V)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    indexers = [p for name, p in model.named_parameters() if ".indexer." in name]
    trunk = [p for name, p in model.named_parameters() if ".indexer." not in name]

    def windows(data, starts):
        return torch.stack([data[s : s + L + 1] for s in starts.tolist()])

    model.train()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        batch = windows(train, torch.randint(0, len(train) - L - 1, (args.batch_size,)))
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out["logits"].flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + out.get("aux_loss", 0.0)).backward()
        for group in (trunk, indexers):  # two models trained side by side: neither's norm scales the other
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        opt.step()
        done = int(30 * step / args.steps)
        print(
            f"\rtrain [{'#' * done}{'.' * (30 - done)}] {step}/{args.steps} loss {loss.item():.3f}", end="", flush=True
        )
    print()
    train_seconds = time.time() - t0

    model.eval()
    with torch.no_grad():
        starts = torch.arange(0, len(val) - L - 1, L + 1)[:8]
        batch = windows(val, starts)
        logits = model(batch[:, :-1])["logits"]
        val_loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
        val_acc = (logits.argmax(-1) == batch[:, 1:]).float().mean().item()
    causal_keys = torch.arange(1, L + 1).sum().item()
    density = sum(layer.last_selection[0].sum().item() for layer in model.plasa_layers())
    metrics = dict(
        train_loss=round(loss.item(), 4),
        val_loss=round(val_loss, 4),
        val_ppl=round(math.exp(val_loss), 2),
        val_acc=round(val_acc, 4),
        density=round(density / (causal_keys * len(model.plasa_layers())), 4),
        k_schedule=[layer.k for layer in model.plasa_layers()],
        train_seconds=round(train_seconds, 2),
    )
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
