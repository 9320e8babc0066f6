"""The trusted trunk: every program's fixed model, trained and validated by the judge's own code.

    python -I -m plasa_lab.evaluation.sandboxed.trunk
        (stdin/stdout: the wire protocol to the judge; blocks processes on passed fds)

A program's text outside its EVOLVE-BLOCKs is the initial program's (plasa_lab.program.checks), so this
process runs that fixed code, from the initial program itself, with the names the blocks define
bound to stand-ins: each layer's indexer and selector become a request to a sandboxed blocks process
(sandboxed.worker) that runs the program's blocks, the aux loss becomes the attention sent there for
the indexers' own training, the schedule is the one the program declared. The blocks process gets
plain arrays (hidden states already detached by the fixed code) and sends back only which keys each
query keeps, checked here at every step: causal, between 1 and min(k, t+1) keys. So the trunk's
weights are trained by the recipe and nothing else, the LM loss, train_loss and the stage-1 gate are
computed here, and validation (sandboxed.validation) runs the trained trunk here too, asking two fresh
blocks processes (A, then B once the judge has retired A: `Servers`) for the selections.

Everything a blocks process sends is untrusted: a malformed, oversized, late or missing answer is the
program's failure with a one-line reason, never an exception of the trunk.

    judge -> trunk   {reference, code, stage, seed, steps, ..., links: {name: [write_fd, read_fd]}}
    trunk -> judge   {"op": "retire", "name": "training" | "validation A"}       judge -> trunk {"ok": true}
                     {"op": "start", "name": "validation B"}                     judge -> trunk {"ok": true}
                     {"op": "report", "ok": true, "metrics": {...}}
                     {"op": "report", "ok": false, "error": "one line" | "gone": name, "doing": "...", "metrics"}
"""

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...contract import (
    FIXED_WEIGHTS,
    GRAD_CLIP,
    MAX_NONEMBED_PARAMS,
    MODEL_CONFIG,
    OPTIMIZER,
    VOCAB_SIZE,
    windows_to_run,
)
from ...data.tokens import train_batches, val_windows
from . import probes, wire
from .validation import Rejection, head_losses, validate

# A safetensors header: 8 bytes of length, then JSON naming each tensor's dtype, shape and offsets
# (well under HEADER_BYTES_PER_TENSOR beside its name), padded to 8 bytes. Nothing more may cross.
HEADER_BYTES_PER_TENSOR = 128
DTYPE_BYTES = dict(float64=8, float32=4, float16=2, bfloat16=2, int64=8, int32=4, int16=2, int8=1, uint8=1, bool=1)
VALUE_BYTES = 4  # the budget counts 4-byte values: a float64 buffer counts twice per element
VALIDATION_BATCH = 8  # windows per validation forward: a quarter of the round trips of the training batch's 2


class Gone(Exception):
    """A blocks process closed its end (it exited or was killed); the judge knows why."""

    def __init__(self, name: str, doing: str):
        super().__init__(f"{name} gone while {doing}")
        self.name, self.doing = name, doing


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# What the blocks declare, and the weights they send back


@dataclass
class Spec:
    schedule: list
    state: dict  # name -> (shape tuple, dtype name)

    @classmethod
    def parse(cls, raw) -> "Spec":
        try:
            state = {
                str(name): (tuple(int(d) for d in shape), str(dtype)) for name, (shape, dtype) in raw["state"].items()
            }
            schedule = raw["schedule"]
            return cls(list(schedule) if isinstance(schedule, list) else schedule, state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise Rejection(f"the worker described the model in a malformed way ({type(e).__name__})") from None

    def indexer_bytes(self) -> int:
        unknown = [name for name, (_, dtype) in self.state.items() if dtype not in DTYPE_BYTES]
        if unknown:
            raise Rejection(f"the indexer's {unknown[0]} has dtype {self.state[unknown[0]][1]}: use float32")
        return sum(math.prod(shape) * DTYPE_BYTES[dtype] for shape, dtype in self.state.values())


def check_schedule(spec: Spec, allow_uniform: bool):
    n, L = MODEL_CONFIG["n_layers"], MODEL_CONFIG["seq_len"]
    ks = spec.schedule
    if not isinstance(ks, list) or len(ks) != n or not all(type(k) is int and 1 <= k <= L for k in ks):
        raise Rejection(f"layer_k_schedule({n}, {L}) returned {ks!r}: expected {n} ints in [1, {L}]")
    if not allow_uniform and len(set(ks)) == 1:
        raise Rejection(f"layer_k_schedule gives every layer k={ks[0]}: the schedule must adapt k per layer")


def check_budget(spec: Spec, trunk_nonembed: int) -> dict:
    """The fresh indexers' size against the budget; returns the parameter counts (in 4-byte values)."""
    indexer = spec.indexer_bytes() / VALUE_BYTES
    if trunk_nonembed + indexer > MAX_NONEMBED_PARAMS:
        raise Rejection(
            f"{trunk_nonembed + indexer:,.0f} non-embedding parameters and buffers (4 bytes a value), over the "
            f"budget of {MAX_NONEMBED_PARAMS:,}: the fixed model holds {trunk_nonembed:,}, make the indexers smaller"
        )
    return dict(nonembed_params=float(trunk_nonembed + indexer), indexer_params=float(indexer))


def expected_snapshot_bytes(spec: Spec) -> int:
    """At most what the declared tensors and a header naming them take: the budget counts every byte."""
    header = 16 + sum(len(name.encode()) + HEADER_BYTES_PER_TENSOR for name in spec.state)
    return spec.indexer_bytes() + header


def check_snapshot(raw: bytes, spec: Spec) -> bytes:
    """The trained indexer weights, parsed without running code (safetensors), exactly as declared;
    returned written anew from the parsed tensors alone (no metadata, nothing the parse skipped), which
    is all the validation processes get."""
    from safetensors.torch import load, save

    try:
        weights = load(raw)
    except Exception as e:
        raise Rejection(f"the trained weights are not a valid safetensors file ({type(e).__name__})") from None
    got = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in weights.items()}
    if got != spec.state:
        extra, lost = sorted(set(got) - set(spec.state)), sorted(set(spec.state) - set(got))
        changed = sorted(n for n in set(got) & set(spec.state) if got[n] != spec.state[n])
        what = (
            f"{extra[0]} is not a weight of a fresh model"
            if extra
            else f"{lost[0]} is missing"
            if lost
            else f"{changed[0]} is {got[changed[0]]}, a fresh model declares {spec.state[changed[0]]}"
        )
        raise Rejection(
            f"the trained weights differ from what freshly built indexers declare ({what}): keep every "
            f"trained value in the indexers' parameters and buffers"
        )
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise Rejection(f"the trained weight {name} holds NaN or inf: keep the training stable")
    return save({name: weights[name].contiguous() for name in sorted(weights)})


# ---------------------------------------------------------------------------------------------
# One blocks process


class BlocksLink:
    """The trunk's side of one sandboxed blocks process: every answer bounded in size and time."""

    def __init__(self, name: str, write_fd: int, read_fd: int, deadline: float):
        self.name = name
        self.channel = wire.Channel(write_fd, read_fd, deadline)

    def talk(self, doing: str, action):
        try:
            return action()
        except wire.Deadline:
            raise
        except wire.WorkerGone:
            self._pending_error(doing)
            raise Gone(self.name, doing) from None
        except wire.ProtocolError as e:
            raise Rejection(f"{doing}: the {self.name} process broke the protocol: {e}") from None

    def _pending_error(self, doing: str):
        """A worker that failed sends its reason, then exits: read it if it is there."""
        try:
            message = self.channel.receive()
        except wire.ProtocolError:
            return
        self._raise_error(message, doing)

    def _raise_error(self, message: dict, doing: str):
        error = message.get("error")
        raise Rejection(
            " ".join(error.split())[:300]
            if isinstance(error, str) and error.strip()
            else f"{doing}: the {self.name} process failed without saying why"
        )

    def send(self, doing: str, header: dict, payload=b""):
        self.talk(doing, lambda: self.channel.send(header, payload))

    def receive_ok(self, doing: str) -> dict:
        message = self.talk(doing, self.channel.receive)
        if message.get("ok") is not True:
            self._raise_error(message, doing)
        return message

    def spec(self) -> Spec:
        return Spec.parse(self.receive_ok("building the indexers").get("spec"))

    def select(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        data = x.detach().to("cpu", torch.float32).contiguous().numpy()
        self.send("a forward pass", dict(op="select", layer=layer, shape=[B, T]), memoryview(data).cast("B"))
        self.receive_ok("a forward pass")
        bits = self.talk("a forward pass", lambda: self.channel.receive_array(((B * T * T + 7) // 8,), np.uint8))
        return torch.from_numpy(np.unpackbits(bits, count=B * T * T).reshape(B, T, T).astype(bool))

    def attention(self, layer: int, attn_probs: torch.Tensor):
        B, _, T, _ = attn_probs.shape
        data = attn_probs.detach().to("cpu", torch.float32).contiguous().numpy()
        self.send("training", dict(op="attention", layer=layer, shape=[B, T]), memoryview(data).cast("B"))

    def step(self):
        self.send("training", dict(op="step"))

    def finish(self, spec: Spec) -> bytes:
        self.send("training", dict(op="finish"))
        done = self.receive_ok("training")
        try:
            n = int(done["snapshot_bytes"])
        except (KeyError, TypeError, ValueError):
            raise Rejection("the training process answered in a malformed way") from None
        if not 0 < n <= expected_snapshot_bytes(spec):
            raise Rejection(
                f"the training process announced {n} bytes of weights; the indexers declare at most "
                f"{expected_snapshot_bytes(spec)}"
            )
        return self.talk("sending the trained weights", lambda: self.channel.receive_bytes(n))

    def load(self, weights: bytes):
        self.send("loading the trained weights", dict(op="load", snapshot_bytes=len(weights)), weights)
        self.receive_ok("loading the trained weights")


class JudgeLink:
    """The trunk's requests to the judge, over its own stdin and stdout: retire a blocks process
    (the judge kills and reaps it), start validation B (only once no other blocks process lives)."""

    def __init__(self, judge_in, judge_out):
        self.judge_in, self.judge_out = judge_in, judge_out

    def ask(self, op: str, name: str):
        wire.send(self.judge_out, dict(op=op, name=name))
        answer = wire.receive(self.judge_in)
        if answer.get("ok") is not True:
            raise RuntimeError(f"the judge refused to {op} {name}")

    def report(self, report: dict):
        wire.send(self.judge_out, dict(report, op="report"))


class Servers:
    """Validation's two blocks processes, one alive at a time. A is opened first (its spec checked
    against the trained one, the weights loaded, the behavioural probe run on random tokens) and
    answers all its windows; then the judge retires it and starts B, which is opened the same way
    (its probe on training text) and answers the rest. What the cut checks compare thus comes from
    processes that never lived at the same time."""

    NAMES = ("validation A", "validation B")

    def __init__(self, links, judge: JudgeLink, start_request: dict, spec: Spec, weights: bytes, on_open):
        self.links, self.judge, self.start_request = links, judge, start_request
        self.spec, self.weights, self.on_open, self.current = spec, weights, on_open, None

    def link(self, s: int) -> BlocksLink:
        if s != self.current:
            if self.current is not None and s < self.current:
                raise RuntimeError("validation went back to a retired server")  # a bug of ours, not the program's
            if self.current is not None:
                self.judge.ask("retire", self.NAMES[self.current])
                self.judge.ask("start", self.NAMES[s])
                self.links[self.NAMES[s]].send("starting", self.start_request)
            self.current = s
            server = self.links[self.NAMES[s]]
            if server.spec() != self.spec:
                raise Rejection(
                    "a fresh import of the program builds other indexers than the ones that were trained: "
                    "the model must not depend on anything but the code"
                )
            server.load(self.weights)
            self.on_open(s)
        return self.links[self.NAMES[s]]


# ---------------------------------------------------------------------------------------------
# The fixed model, with the blocks answered by a blocks process


class Selections:
    """What the trunk's stand-ins for the blocks ask: the blocks process now answering (`link`)."""

    def __init__(self, schedule: list, device: torch.device):
        self.schedule, self.device, self.link, self.phase = list(schedule), device, None, "during training"

    def select(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        kept = self.link.select(layer, x)
        if problem := probes.selection_violation(kept[None], [self.schedule[layer]], first_layer=layer):
            raise Rejection(f"{self.phase}: {problem}")
        return kept.to(self.device)

    def attention(self, layer: int, attn_probs: torch.Tensor):
        self.link.attention(layer, attn_probs)


def build_trunk(reference_code: str, selections: Selections) -> torch.nn.Module:
    """The fixed model of `reference_code` (the initial program: every program's fixed text), its
    block names bound to stand-ins that ask `selections`. The fixed code calls
    `select_topk(self.indexer(x.detach()), k, layer)` and `indexer_aux_loss(att.detach(), ...)`: the
    stand-in indexer returns the blocks' selection, the stand-in selector passes it on, the stand-in
    loss sends the attention to the blocks' own training and adds nothing to the trunk's loss."""
    namespace = {"__name__": "plasa_trunk"}
    exec(compile(reference_code, "initial_program.py", "exec"), namespace)

    class RemoteIndexer(torch.nn.Module):
        def __init__(self, d_model, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return selections.select(self.layer, x)

    def remote_aux_loss(attn_probs, scores, selected, layer):
        selections.attention(layer, attn_probs)
        return None

    namespace.update(
        LightningIndexer=RemoteIndexer,
        select_topk=lambda selected, k, layer: selected,
        indexer_aux_loss=remote_aux_loss,
        init_indexer=lambda indexer, layer: None,
        layer_k_schedule=lambda n_layers, seq_len: list(selections.schedule),
    )
    return namespace["build_model"](VOCAB_SIZE).to(selections.device)


def compile_fixed_parts(model, device: torch.device, compiler=None) -> str:
    """Each block's SwiGLU (pure arithmetic of the fixed model, no call to the blocks) compiled with
    torch.compile, built and run once forwards and backwards before training depends on it; on any
    failure every block stays eager. Returns what was done, for the log. The compiled step computes
    the same function in another order of floating-point operations (val_loss within 1e-4)."""
    compiler = compiler or (lambda f: torch.compile(f, dynamic=False))
    ffns = [block.ffn for block in model.blocks]
    eager = [ffn.forward for ffn in ffns]
    try:
        for ffn in ffns:
            ffn.forward = compiler(ffn.forward)
        x = torch.zeros(2, MODEL_CONFIG["seq_len"], MODEL_CONFIG["d_model"], device=device, requires_grad=True)
        for ffn in ffns:
            ffn(x).sum().backward()
        model.zero_grad(set_to_none=True)
        return "the fixed FFNs compiled (torch.compile)"
    except Exception as e:  # a missing compiler, an unsupported device or version: the same step, eager
        for ffn, forward in zip(ffns, eager):
            ffn.forward = forward
        model.zero_grad(set_to_none=True)
        return f"eager (torch.compile failed: {' '.join(str(e).split())[:120]})"


def nonembed_params(model) -> int:
    return sum(t.numel() for name, t in model.state_dict().items() if name not in FIXED_WEIGHTS)


@contextlib.contextmanager
def without_lm_head(model):
    """Forward passes that stop at the final norm: the LM head, most of a forward's arithmetic, is
    applied afterwards to the rows that need logits only."""
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    try:
        yield
    finally:
        model.lm_head = head


def train(model, selections, trainer: BlocksLink, batches, steps, device, seed, check_every) -> tuple[list, float]:
    """The recipe: AdamW, LM loss, the trunk's gradients clipped at GRAD_CLIP. After each forward the
    blocks process takes its indexers' step on the attention it was sent, while this one takes its own."""
    torch.manual_seed(seed)  # dropout's stream: the same for every program
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER, fused=device.type in ("cpu", "cuda"))
    model.train()
    selections.link, selections.phase = trainer, "during training"
    all_batches = torch.stack([next(batches) for _ in range(steps)]).to(device) if steps else None
    losses = torch.empty(steps, device=device)
    start, check_every = time.perf_counter(), max(1, int(check_every))
    for step in range(steps):
        batch = all_batches[step]
        logits = model(batch[:, :-1])["logits"]
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        trainer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        losses[step] = loss.detach()
        if (step + 1) % check_every == 0 or step + 1 == steps:
            bad = (~torch.isfinite(losses[: step + 1])).nonzero()
            if len(bad):  # the first bad step since the last check, named exactly
                first = int(bad[0])
                raise Rejection(
                    f"training LM loss became {losses[first].item()} at step {first + 1}: keep the selection sane"
                )
            last = losses[step].item()
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps} loss {last:.4f} ({elapsed / (step + 1):.3f} s/step)")
    return losses.tolist(), time.perf_counter() - start


def forward_with(model, selections, link_for, device):
    """forward(tokens, server, rows=None, targets=None) -> (scores, selections [layers, B, T, T]): scores
    are the logits (on the CPU) of every row, or with `rows` (a list) of those rows only, in that order;
    with `targets` (of those rows) their (loss, hit) per token instead, the logits never held whole.
    The LM head, most of a forward's arithmetic, runs only where a score needs it. `link_for(server)`:
    the blocks process that answers that server's selections."""
    model.eval()

    def forward(tokens, server, rows=None, targets=None):
        selections.link = link_for(server)
        with torch.no_grad(), without_lm_head(model):
            hidden = model(tokens.to(device))["logits"]  # the final norm's output: the LM head is skipped
        kept = torch.stack([layer.last_selection for layer in model.plasa_layers()]).to("cpu")
        wanted = hidden if rows is None else hidden[list(rows)]
        if not len(wanted):
            return None, kept
        with torch.no_grad():
            if targets is not None:
                return tuple(t.to("cpu") for t in head_losses(wanted, model.lm_head, targets.to(device))), kept
            return model.lm_head(wanted).float().to("cpu"), kept

    return forward


# ---------------------------------------------------------------------------------------------
# A stage


def run_stage(request: dict, links: dict[str, BlocksLink], judge: JudgeLink, metrics: dict) -> dict:
    """Build, train, check and validate one program; fills `metrics` as it goes."""
    device = torch.device(request["device"])
    blocks_request = dict(mode="serve", code=request["code"], seed=request["seed"], device=device.type, threads=1)
    trainer = links["training"]
    trainer.send("starting", {**blocks_request, "mode": "train"})
    links["validation A"].send("starting", blocks_request)  # it imports and builds while the trunk trains
    spec = trainer.spec()
    check_schedule(spec, request["allow_uniform_schedule"])
    selections = Selections(spec.schedule, device)
    torch.manual_seed(request["seed"])  # the trunk's initialisation: the same for every program
    model = build_trunk(request["reference"], selections)
    metrics.update(check_budget(spec, nonembed_params(model)))
    if request.get("compile"):
        log(f"fixed step: {compile_fixed_parts(model, device)}")

    B, L, steps = request["batch_size"], request["seq_len"], request["steps"]
    train_tokens = np.fromfile(request["train_path"], dtype="<u2")
    batches = train_batches(train_tokens, B, L, request["seed"])
    log(f"training {steps} steps (seed {request['seed']}, {device.type})")
    losses, metrics["train_seconds"] = train(
        model, selections, trainer, batches, steps, device, request["seed"], request["check_every"]
    )
    if request["stage"] == 1:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        if not last < first:
            raise Rejection(
                f"the training loss did not fall in {steps} steps ({first:.3f} -> {last:.3f}): the model does not learn"
            )
        metrics["train_loss"] = last
    else:
        tail = losses[-max(1, len(losses) // 10) :]
        metrics["train_loss"] = sum(tail) / len(tail)  # mean over the last 10% of steps
    weights = check_snapshot(trainer.finish(spec), spec)
    judge.ask("retire", "training")

    selections.phase = "during validation"
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))  # an order the child cannot predict
    random_tokens = torch.from_numpy(rng.integers(0, VOCAB_SIZE, (B, L)))
    train_text = next(train_batches(train_tokens, B, L, request["seed"]))[:, :-1]
    probe_tokens = (("on random tokens", random_tokens), ("on training text", train_text))

    def on_open(s):  # each server's behaviour checked before it answers a validation window
        log(f"checking behaviour of validation {'AB'[s]} (causality, selection, batch independence, no state)")
        what, tokens = probe_tokens[s]

        def on_server(t, logits=True):  # logits=False: no LM head (equal selections mean equal logits)
            return forward(t, s, None if logits else [])

        if failure := probes.probe(on_server, spec.schedule, tokens, VOCAB_SIZE):
            raise Rejection(f"{what}: {failure}")
        if request["stage"] == 2 and s == 0:
            metrics["stage1_passed"] = 1.0  # stage 1's checks held; what fails from here is stage 2's own

    servers = Servers(links, judge, blocks_request, spec, weights, on_open)
    forward = forward_with(model, selections, servers.link, device)
    n_scored, rounds = request["n_scored"], request["cut_rounds"]
    val_tokens = np.fromfile(request["val_path"], dtype="<u2")
    windows = val_windows(val_tokens, windows_to_run(n_scored, L, rounds), L)
    cuts = f"every position cut {rounds} times" if rounds else "cuts at random positions"
    log(f"validating on {n_scored} windows ({len(windows)} run, {cuts})")
    metrics.update(validate(forward, windows, n_scored, VALIDATION_BATCH, spec.schedule, rng, rounds))
    return metrics


def main():
    judge_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    judge = JudgeLink(sys.stdin.buffer, judge_out)
    request = wire.receive(sys.stdin.buffer)
    torch.set_num_threads(int(request["threads"]))
    deadline = time.monotonic() + float(request["seconds"])
    links = {name: BlocksLink(name, fds[0], fds[1], deadline) for name, fds in request["links"].items()}
    metrics = {}
    try:
        run_stage(request, links, judge, metrics)
        report = dict(ok=True, metrics=metrics)
    except Rejection as e:
        report = dict(ok=False, error=str(e), metrics=metrics)
    except Gone as e:
        report = dict(ok=False, gone=e.name, doing=e.doing, metrics=metrics)
    except wire.Deadline:
        report = dict(ok=False, deadline=True, metrics=metrics)
    except Exception as e:  # whatever a worker's answer did to the arithmetic here: the program's failure
        report = dict(ok=False, error=f"the judge could not use the program's answers: {type(e).__name__}: {e}"[:300])
        report["metrics"] = metrics
    judge.report({**report, "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)}})


if __name__ == "__main__":
    main()
