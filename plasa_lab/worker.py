"""The untrusted side: runs a child program inside the sandbox and does only what the judge asks.

    python -I -m plasa_lab.worker        (stdin/stdout: the plasa_lab.wire protocol)

Nothing here is trusted and nothing here decides a score: the child's code shares this process
and could change any of it. The worker builds the model, trains it with the fixed recipe and
sends back a snapshot of its weights (`train`), or loads a snapshot and answers forward passes
(`serve`). The judge (plasa_lab.judge) checks everything that comes back and computes every
metric outside this process; a worker that lies can only fail its own evaluation.

Messages (one JSON line each, then raw little-endian bytes where noted):
    judge -> worker   {"mode": "train"|"serve", "code", "seed", "device", "threads", ...}
    worker -> judge   {"ok": true, "spec": {...}}  what a freshly built model declares
    train:  worker -> judge   {"ok": true, "losses": [...], "snapshot_bytes": n} + snapshot
    serve:  judge -> worker   {"op": "load", "snapshot_bytes": n} + the snapshot (safetensors)
            worker -> judge   {"ok": true}
            judge -> worker   {"op": "forward", "shape": [B, T]} + int64 tokens
            worker -> judge   {"ok": true} + float32 logits [B,T,V] + uint8 selections [layers,B,T,T]
    any failure: {"ok": false, "error": "one line"}, then the worker exits.
"""

import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import wire
from .constants import GRAD_CLIP, MODEL_CONFIG, OPTIMIZER, VOCAB_SIZE
from .program import load_program
from .tokens import train_batches
from .util import message_line

PROGRAM_FILE = "program.py"  # in the worker's private folder
# Training steps between finiteness checks and progress lines: the loop's only host syncs. A sync
# drains the device queue, so every few dozen steps costs nothing measurable; every step would
# stall a launch-bound GPU once per step. The judge may ask for another interval (tests do).
PROGRESS_EVERY = 50


class Refusal(Exception):
    """The child broke a rule the worker can see; the message is the one-line failure."""


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def describe(exc: BaseException, doing: str) -> str:
    """`doing: TypeName at line N of the program: message` (the line of the child's file, if any)."""
    if isinstance(exc, MemoryError):
        return f"{doing}: ran out of memory: use less memory"
    program = os.path.abspath(PROGRAM_FILE)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == program]
    where = f" at line {frames[-1].lineno} of the program" if frames else ""
    return f"{doing}: {type(exc).__name__}{where}: {message_line(exc)}".rstrip(": ")


# ---------------------------------------------------------------------------------------------
# Building


def build(request: dict):
    """Import the program, build its model under the seed, describe what it declares."""
    Path(PROGRAM_FILE).write_text(request["code"])
    try:
        module = load_program(PROGRAM_FILE)
    except BaseException as e:  # SyntaxError, ImportError, SystemExit, anything at import time
        raise Refusal(describe(e, "importing the program failed"))
    if getattr(module, "MODEL_CONFIG", None) != MODEL_CONFIG:
        raise Refusal(f"MODEL_CONFIG is {getattr(module, 'MODEL_CONFIG', None)}, must stay {MODEL_CONFIG}")
    if not callable(getattr(module, "build_model", None)):
        raise Refusal("the program defines no build_model(vocab_size) function")
    device = resolve_device(request["device"])
    torch.manual_seed(request["seed"])
    model = module.build_model(VOCAB_SIZE)
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "plasa_layers", None)):
        raise Refusal("build_model() must return a torch.nn.Module with a plasa_layers() method")
    model = model.to(device)
    n, L = MODEL_CONFIG["n_layers"], MODEL_CONFIG["seq_len"]
    schedule = module.layer_k_schedule(n, L) if callable(getattr(module, "layer_k_schedule", None)) else None
    spec = dict(
        device=device.type,
        schedule=[int(k) if isinstance(k, int) else repr(k)[:20] for k in schedule]
        if isinstance(schedule, (list, tuple))
        else repr(schedule)[:80],
        layer_ks=[
            int(k) if isinstance(k := getattr(layer, "k", None), int) else None for layer in model.plasa_layers()
        ],
        state={name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in model.state_dict().items()},
    )
    return module, model, device, spec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Training (the fixed recipe)


def lm_loss_and_aux(model, batch):
    out = model(batch[:, :-1])
    logits = out.get("logits") if isinstance(out, dict) else None
    if not torch.is_tensor(logits) or logits.shape != (*batch[:, 1:].shape, VOCAB_SIZE):
        raise Refusal("model output must be a dict whose 'logits' have shape [B, T, vocab_size]")
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    aux = out.get("aux_loss")
    if aux is not None and (not torch.is_tensor(aux) or aux.numel() != 1):
        raise Refusal("aux_loss must be a scalar tensor")
    return loss, aux


def train(model, batches, steps, device, seed, check_every=PROGRESS_EVERY):
    """AdamW, grad clip, LM loss + the child's aux_loss, with no host sync inside a step: the batches
    go to the device in one copy before the first step, each step's losses stay on the device, and
    they are checked for finiteness every `check_every` steps and at the end (one sync each). The
    first non-finite step is still named exactly, and every step's loss comes back (the curve).
    The numbers do not depend on `check_every`: it only decides when the host looks."""
    torch.manual_seed(seed)  # dropout's stream: the same for every program, whatever its init drew
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER, fused=fused)
    model.train()
    check_every = max(1, int(check_every))
    start, checked = time.perf_counter(), 0
    # All batches at once (steps x B x (T+1) int64: 2 MB for 1000 steps): no copy from pageable
    # host memory between two steps. The batch stream has its own generator, so drawing it ahead
    # leaves dropout's stream as it was.
    all_batches = torch.stack([next(batches) for _ in range(steps)]).to(device) if steps else None
    lm_losses = torch.empty(steps, device=device)
    total_losses = torch.empty(steps, device=device)
    for step in range(steps):
        loss, aux = lm_loss_and_aux(model, all_batches[step])
        total = loss if aux is None else loss + aux.reshape(())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # the norm stays on the device
        optimizer.step()
        lm_losses[step], total_losses[step] = loss.detach(), total.detach()  # device copies, no sync
        if (step + 1) % check_every == 0 or step + 1 == steps:
            _check_finite(lm_losses, total_losses, checked, step + 1)
            checked = step + 1
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps} loss {lm_losses[step].item():.4f} ({elapsed / (step + 1):.3f} s/step)")
    return lm_losses.tolist(), time.perf_counter() - start


def _check_finite(lm_losses, total_losses, begin, end):
    finite = torch.isfinite(total_losses[begin:end])
    if not bool(finite.all()):
        i = begin + int((~finite).nonzero()[0])
        what = "LM loss" if not math.isfinite(lm_losses[i].item()) else "aux_loss"
        raise Refusal(
            f"training {what} became {total_losses[i].item()} at step {i + 1}: keep the training signal finite"
        )


def snapshot(model) -> bytes:
    """The weights as safetensors bytes: parameters and persistent buffers, nothing else."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()})


def run_train(request: dict, channel_out, spec_sent):
    module, model, device, spec = build(request)
    spec_sent(spec)
    train_tokens = np.fromfile(request["train_path"], dtype="<u2")
    batches = train_batches(train_tokens, request["batch_size"], request["seq_len"], request["seed"])
    log(f"training {request['steps']} steps (seed {request['seed']}, {device.type})")
    try:
        losses, seconds = train(
            model, batches, request["steps"], device, request["seed"], request.get("check_every") or PROGRESS_EVERY
        )
    except Refusal:
        raise
    except BaseException as e:
        raise Refusal(describe(e, "training failed"))
    try:
        weights = snapshot(model)
    except BaseException as e:
        raise Refusal(describe(e, "saving the weights failed"))
    wire.send(channel_out, dict(ok=True, losses=losses, train_seconds=seconds, snapshot_bytes=len(weights)), weights)


# ---------------------------------------------------------------------------------------------
# Serving forward passes of a snapshot


def run_serve(request: dict, channel_in, channel_out, spec_sent):
    """Build first (while the judge may still be training elsewhere), then load the weights it sends."""
    from safetensors.torch import load

    module, model, device, spec = build(request)
    spec_sent(spec)
    ask = wire.receive(channel_in)
    if ask.get("op") != "load":
        return
    weights = wire.receive_bytes(channel_in, ask["snapshot_bytes"])
    try:
        model.load_state_dict({k: v.to(device) for k, v in load(weights).items()}, strict=True)
    except BaseException as e:
        raise Refusal(describe(e, "loading the trained weights into a fresh model failed"))
    del weights
    model.eval()
    wire.send(channel_out, dict(ok=True))
    while True:
        ask = wire.receive(channel_in)
        if ask.get("op") != "forward":
            return
        B, T = ask["shape"]
        tokens = torch.from_numpy(
            np.frombuffer(wire.receive_bytes(channel_in, B * T * 8), dtype="<i8").reshape(B, T).copy()
        )
        try:
            with torch.no_grad():
                out = model(tokens.to(device))
                logits = out["logits"] if isinstance(out, dict) else out
                selections = torch.stack([layer.last_selection for layer in model.plasa_layers()])
        except BaseException as e:
            raise Refusal(describe(e, "a forward pass failed"))
        # Shapes and dtypes are the judge's to check: send what came out, converted as far as it goes.
        logits = logits.detach().float().to("cpu").contiguous().numpy().astype("<f4", copy=False)
        selections = selections.detach().to("cpu").to(torch.uint8).contiguous().numpy()
        expected = (B, T, VOCAB_SIZE)
        if logits.shape != expected or selections.shape != (len(model.plasa_layers()), B, T, T):
            raise Refusal(
                f"logits have shape {tuple(logits.shape)} and selections {tuple(selections.shape)}: "
                f"expected {expected} and (layers, {B}, {T}, {T})"
            )
        wire.send(channel_out, dict(ok=True), memoryview(logits.reshape(-1).view(np.uint8)))  # no 50 MB copy
        channel_out.write(memoryview(selections.reshape(-1)))
        channel_out.flush()


def main():
    # The protocol owns the real stdout; whatever the child prints goes to stderr (capped and logged).
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel_in = sys.stdin.buffer
    request = wire.receive(channel_in)
    torch.set_num_threads(int(request["threads"]))

    def spec_sent(spec):
        wire.send(channel_out, dict(ok=True, spec=spec))

    try:
        if request["mode"] == "train":
            run_train(request, channel_out, spec_sent)
        else:
            run_serve(request, channel_in, channel_out, spec_sent)
    except Refusal as e:
        wire.send(channel_out, dict(ok=False, error=str(e)))
    except EOFError:
        pass  # the judge is done with us
    except BaseException as e:
        wire.send(channel_out, dict(ok=False, error=describe(e, "the worker failed")))
    channel_out.flush()


if __name__ == "__main__":
    main()
