"""The untrusted side: a program's EVOLVE-BLOCKs, run inside the sandbox, answering the trusted trunk.

    python -I -m plasa_lab.evaluation.sandboxed.worker
        (stdin/stdout: the wire protocol, to the trunk)

The fixed model never exists in this process. The trunk (sandboxed.trunk) runs it elsewhere and sends
this one, per layer, the hidden states that layer's indexer reads (plain arrays: detached from
everything) and takes back only the keys each query keeps, which it checks (causal, within the
layer's k) before attention uses them. So nothing block code can reach here leads to a fixed weight,
an optimiser or an autograd node of the trunk, and the trunk's training is the recipe's whatever this
process does. In training the indexers learn here, from the program's aux loss alone, with an AdamW
and a gradient clip of their own (the recipe's settings); their weights go back as a snapshot, which
two fresh imports of the program load to answer validation.

Nothing here is trusted and nothing here decides a score: the child's code shares this process and
could change any of it; a worker that lies can only fail its own evaluation.

Messages (one JSON line each, then raw little-endian bytes where noted):
    trunk -> worker   {"mode": "train"|"serve", "code", "seed", "device", "threads"}
    worker -> trunk   {"ok": true, "spec": {"schedule": [...], "state": {name: [shape, dtype]}}}
    trunk -> worker   {"op": "select", "layer": l, "shape": [B, T]} + float32 hidden states [B, T, C]
    worker -> trunk   {"ok": true} + the selection [B, T, T] as bits (numpy.packbits)
  train:
    trunk -> worker   {"op": "attention", "layer": l, "shape": [B, T]} + float32 attention [B, H, T, T]
    trunk -> worker   {"op": "step"}     no answer: the indexers' loss, backward and optimiser step
    trunk -> worker   {"op": "finish"}
    worker -> trunk   {"ok": true, "aux_losses": [...], "snapshot_bytes": n} + the indexers' weights
  serve:
    trunk -> worker   {"op": "load", "snapshot_bytes": n} + weights; worker -> trunk {"ok": true}
  any failure: {"ok": false, "error": "one line"}, then the worker exits.
"""

import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from ...contract import GRAD_CLIP, MODEL_CONFIG, OPTIMIZER
from ...program.blocks import load_program
from ...util import message_line
from . import wire

PROGRAM_FILE = "program.py"  # in the worker's private folder
BLOCK_API = ("LightningIndexer", "select_topk", "layer_k_schedule", "indexer_aux_loss", "init_indexer")


class Refusal(Exception):
    """The child broke a rule the worker can see; the message is the one-line failure."""


def describe(exc: BaseException, doing: str) -> str:
    """`doing: TypeName at line N of the program: message` (the line of the child's file, if any)."""
    if isinstance(exc, MemoryError):
        return f"{doing}: ran out of memory: use less memory"
    program = os.path.abspath(PROGRAM_FILE)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == program]
    # a line of the normalised text this process runs: the judge names the child's own line (original_line)
    where = f" at line {frames[-1].lineno} of the program" if frames else ""
    return f"{doing}: {type(exc).__name__}{where}: {message_line(exc)}".rstrip(": ")


def guarded(doing: str, action):
    """action(), with any exception of the child's code turned into a one-line Refusal."""
    try:
        return action()
    except Refusal:
        raise
    except BaseException as e:
        raise Refusal(describe(e, doing))


class Blocks:
    """The program's blocks for every layer: an indexer each, the selector, the schedule, the aux loss."""

    def __init__(self, request: dict):
        Path(PROGRAM_FILE).write_text(request["code"])
        self.module = guarded("importing the program failed", lambda: load_program(PROGRAM_FILE))
        if getattr(self.module, "MODEL_CONFIG", None) != MODEL_CONFIG:
            raise Refusal(f"MODEL_CONFIG is {getattr(self.module, 'MODEL_CONFIG', None)}, must stay {MODEL_CONFIG}")
        missing = [name for name in BLOCK_API if not callable(getattr(self.module, name, None))]
        if missing:
            raise Refusal(f"the program defines no {missing[0]}: keep every block's interface")
        name = request["device"]
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(name)
        n, L, C = MODEL_CONFIG["n_layers"], MODEL_CONFIG["seq_len"], MODEL_CONFIG["d_model"]
        self.d_model, self.heads = C, MODEL_CONFIG["n_heads"]
        torch.manual_seed(request["seed"])
        self.schedule = guarded("layer_k_schedule failed", lambda: self.module.layer_k_schedule(n, L))
        indexers = [
            guarded("building the indexer failed", lambda i=i: self.module.LightningIndexer(C, i)) for i in range(n)
        ]
        if not all(isinstance(ix, torch.nn.Module) for ix in indexers):
            raise Refusal("LightningIndexer(d_model, layer) must build a torch.nn.Module")
        self.indexers = torch.nn.ModuleList(indexers)
        init_weights = getattr(getattr(self.module, "PLASAModel", None), "_init_weights", None)
        if callable(init_weights):  # what the fixed model does to every Linear and Embedding, first
            guarded("initialising the indexer failed", lambda: self.indexers.apply(init_weights))
        for i, ix in enumerate(indexers):
            guarded("init_indexer failed", lambda ix=ix, i=i: self.module.init_indexer(ix, i))
        self.indexers.to(self.device)
        self.scores, self.kept, self.aux_terms = {}, {}, []

    def spec(self) -> dict:
        schedule = self.schedule
        return dict(
            schedule=[int(k) if isinstance(k, int) else repr(k)[:20] for k in schedule]
            if isinstance(schedule, (list, tuple))
            else repr(schedule)[:80],
            state={
                name: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                for name, t in self.indexers.state_dict().items()
            },
        )

    def select(self, layer: int, x: torch.Tensor, training: bool) -> np.ndarray:
        """The keys each query of `layer` keeps, as a bool array [B, T, T] (the trunk checks it)."""
        k = self.schedule[layer]

        def run():
            with torch.set_grad_enabled(training):
                scores = self.indexers[layer](x)
                return scores, self.module.select_topk(scores, k, layer)

        scores, kept = guarded("the indexer or select_topk failed", run)
        B, T = x.shape[:2]
        if not torch.is_tensor(kept) or tuple(kept.shape) != (B, T, T):
            shape = tuple(kept.shape) if torch.is_tensor(kept) else type(kept).__name__
            raise Refusal(f"select_topk returned {shape}: expected a BoolTensor of shape {(B, T, T)}")
        kept = kept.detach().to(torch.bool)
        if training:
            self.scores[layer], self.kept[layer] = scores, kept
        return kept.to("cpu").numpy()

    def attention(self, layer: int, attn_probs: torch.Tensor):
        if layer not in self.scores:
            return
        aux = guarded(
            "indexer_aux_loss failed",
            lambda: self.module.indexer_aux_loss(attn_probs, self.scores[layer], self.kept[layer], layer),
        )
        if not torch.is_tensor(aux) or aux.numel() != 1:
            raise Refusal("indexer_aux_loss must return a scalar tensor")
        self.aux_terms.append(aux.reshape(()))

    def release(self):
        self.scores, self.kept, self.aux_terms = {}, {}, []


class IndexerTraining:
    """The indexers' own optimiser step after each trunk step: the program's aux loss, AdamW, clip."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks
        self.params = [p for p in blocks.indexers.parameters() if p.requires_grad]
        fused = blocks.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(self.params, **OPTIMIZER, fused=fused) if self.params else None
        self.losses, self.step_index = [], 0

    def step(self):
        self.step_index += 1
        terms = self.blocks.aux_terms
        if terms:
            total = torch.stack(terms).sum()
            value = float(total.detach())
            if not math.isfinite(value):
                raise Refusal(
                    f"training aux_loss became {value} at step {self.step_index}: keep the training signal finite"
                )
            self.losses.append(value)
            if self.optimizer is not None and total.requires_grad:
                guarded("the aux loss's backward pass failed", total.backward)
                torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.blocks.release()


def snapshot(blocks: Blocks) -> bytes:
    """The indexers' weights as safetensors bytes: parameters and persistent buffers, nothing else."""
    from safetensors.torch import save

    state = blocks.indexers.state_dict()
    return save({name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()})


def receive_floats(channel_in, shape) -> torch.Tensor:
    n = math.prod(shape)
    raw = wire.receive_bytes(channel_in, 4 * n)
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).copy())


def answer(blocks: Blocks, channel_in, channel_out, training: IndexerTraining | None):
    """The trunk's requests until it closes the channel (or asks to finish a training)."""
    from safetensors.torch import load

    while True:
        ask = wire.receive(channel_in)
        op = ask.get("op")
        if op in ("select", "attention"):
            layer, (B, T) = int(ask["layer"]), ask["shape"]
            if op == "select":
                x = receive_floats(channel_in, (B, T, blocks.d_model)).to(blocks.device)
                kept = blocks.select(layer, x, training is not None)
                wire.send(channel_out, dict(ok=True), np.packbits(kept.reshape(-1)).tobytes())
            else:
                attn = receive_floats(channel_in, (B, blocks.heads, T, T)).to(blocks.device)
                blocks.attention(layer, attn)
        elif op == "step" and training is not None:
            training.step()
        elif op == "finish" and training is not None:
            weights = guarded("saving the indexers' weights failed", lambda: snapshot(blocks))
            wire.send(channel_out, dict(ok=True, aux_losses=training.losses, snapshot_bytes=len(weights)), weights)
            return
        elif op == "load" and training is None:
            weights = wire.receive_bytes(channel_in, int(ask["snapshot_bytes"]))
            guarded(
                "loading the trained weights into a fresh import failed",
                lambda weights=weights: blocks.indexers.load_state_dict(
                    {k: v.to(blocks.device) for k, v in load(weights).items()}, strict=True
                ),
            )
            blocks.indexers.eval()
            wire.send(channel_out, dict(ok=True))
        else:
            return


def main():
    # The protocol owns the real stdout; whatever the child prints goes to stderr (capped and logged).
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel_in = sys.stdin.buffer
    try:
        request = wire.receive(channel_in)
        torch.set_num_threads(int(request["threads"]))
        blocks = Blocks(request)
        wire.send(channel_out, dict(ok=True, spec=blocks.spec()))
        training = None
        if request["mode"] == "train":
            blocks.indexers.train()
            training = IndexerTraining(blocks)
        else:
            blocks.indexers.eval()
        answer(blocks, channel_in, channel_out, training)
    except Refusal as e:
        wire.send(channel_out, dict(ok=False, error=str(e)))
    except EOFError:
        pass  # the trunk is done with us
    except BaseException as e:
        wire.send(channel_out, dict(ok=False, error=describe(e, "the worker failed")))
    channel_out.flush()


if __name__ == "__main__":
    main()
