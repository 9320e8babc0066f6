"""The trusted judge: one stage of one program, scored outside every process that runs its code.

    train   a sandboxed worker (plasa_lab.worker) builds the model under the seed, trains it with
            the fixed recipe on the train split (the only data it can see) and sends back its
            weights. Before it trains, the judge checks what the fresh model declares (schedule,
            layer k, parameter budget).
    check   the weights must be exactly the parameters and buffers a freshly built model declares
            (names, shapes, dtypes; finite), within the budget. Nothing else the training process
            held (a list of extra weights, a memory of inputs) reaches the score.
    serve   two fresh sandboxed workers import the program anew, load those weights and answer
            forward passes. The judge sends every input and receives logits and selections; it
            checks them (shape, dtype, finiteness), runs the behavioural probes, and computes loss,
            accuracy, perplexity and density itself. The workers never see a target they are
            scored on as a target, nor the validation split as a file, nor any result.
    leaks   random validation windows (30%, at least 16: unscored extra windows where the scored
            ones are fewer) also go, cut at a random position and spliced with other validation text
            after the cut, to the *other* worker, shuffled among the real windows in batches of the
            same shape. Their logits up to the cut must equal those of the window run in full.
            Logits that depend on anything but the weights and the prefix (a peek ahead, inputs
            remembered from earlier calls, test-time training) then differ, whichever came first,
            because the two workers have different histories.

Everything a worker sends is untrusted: a malformed, oversized, late or missing answer is the
program's failure with a one-line reason, never an exception of the judge.
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import probes, wire
from .constants import (
    FIXED_WEIGHTS,
    MAX_NONEMBED_PARAMS,
    MODEL_CONFIG,
    PPL_CAP,
    STAGE1_TRAINING_STEPS,
    VOCAB_SIZE,
    get_profile,
)
from .jobs import Job, StageResult
from .sandbox import Limits, SandboxedProcess, SandboxUnavailable, gpu_device_nodes
from .tokens import CorpusError, train_batches, val_windows
from .util import first_line

# Validation windows re-run, cut at a random position, by the other worker: about 30% of them, and at
# least MIN_CHECKED (extra windows, run but not scored, where the scored ones are fewer). One cut per
# window: two copies of one window in one process would let a model that remembers inputs answer the
# shorter cut from the longer. A leak through top-k shows only at some cuts (only at a query whose
# selection is a choice, t + 1 > k, and only where the leaked score changes it): a one-ahead peek shows
# at 44% of uniform cuts and 60% of cuts where a selection is a choice (measured, untrained model), so
# half the cuts fall there and 16 cuts miss it with odds of about 1e-5.
CHECKED_SHARE = 0.3
MIN_CHECKED = 16
STAGE1_WINDOWS = 8  # stage 1 scores 4 batches (and runs 8 more windows for the cut checks)
TRAIN_FILE_INSIDE = "/data/train.bin"
SNAPSHOT_SLACK = 1 << 20  # bytes of safetensors header allowed beyond the tensors themselves


class Rejection(Exception):
    """The program broke a rule; the message is the one-line failure."""


# ---------------------------------------------------------------------------------------------
# Workers


class Worker:
    """One sandboxed plasa_lab.worker process and the channel to it."""

    def __init__(self, job: Job, name: str, deadline: float, threads: int, binds=None, on_line=None):
        self.name = name
        gpu = job.device != "cpu" and bool(gpu_device_nodes())
        limits = Limits(
            wall_seconds=max(1.0, deadline - time.monotonic()),
            memory_bytes=None if gpu else int(job.memory_gb * (1 << 30)),
        )
        hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if job.device == "cpu" else None  # nothing probes a GPU it may not use
        self.process = SandboxedProcess(
            [sys.executable, "-I", "-m", "plasa_lab.worker"],
            limits,
            threads,
            isolation=job.sandbox,
            binds=binds,
            gpu=gpu,
            env_extra=hide_gpus,
            on_stderr_line=on_line,
        )
        self.channel = wire.Channel(self.process.proc.stdin.fileno(), self.process.proc.stdout.fileno(), deadline)

    def talk(self, doing: str, action):
        """action() on the channel; a worker that left or broke the protocol is the program's failure."""
        try:
            return action()
        except wire.Deadline:
            raise
        except wire.WorkerGone:
            raise Rejection(self.exit_reason(doing)) from None
        except wire.ProtocolError as e:
            raise Rejection(f"{doing}: the {self.name} process broke the protocol: {e}") from None

    def send(self, doing: str, header: dict, payload: bytes = b""):
        self.talk(doing, lambda: self.channel.send(header, payload))

    def receive_ok(self, doing: str) -> dict:
        """The next message, which must say ok; the worker's own error line otherwise."""
        message = self.talk(doing, self.channel.receive)
        if message.get("ok") is not True:
            error = message.get("error")
            raise Rejection(
                one_line(error)
                if isinstance(error, str) and error.strip()
                else f"{doing}: the {self.name} process failed without saying why"
            )
        return message

    def exit_reason(self, doing: str) -> str:
        self.process.wait()
        stderr = self.process.stderr_text()
        if self.process.output_exceeded:
            return (
                f"wrote over {self.process.budget.total >> 10} KiB to stdout/stderr (limit 1 MiB), stopped: "
                f"remove the prints"
            )
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            limit = self.process.limits.memory_bytes
            return f"ran out of memory{f' (limit {limit >> 30} GiB)' if limit else ''}: use less memory"
        how = (
            f"killed by {self.process.signal_name}"
            if self.process.signal_name
            else f"exited with code {self.process.proc.returncode}"
        )
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
        return f"{doing}: the {self.name} process {how} before answering: {tail[0][:200]}".rstrip(": ")

    def close(self):
        self.process.close()


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


# ---------------------------------------------------------------------------------------------
# What the fresh model declares, and what the training sent back


@dataclass
class Spec:
    schedule: list
    layer_ks: list
    state: dict  # name -> (shape tuple, dtype name)

    @classmethod
    def parse(cls, raw) -> "Spec":
        try:
            state = {
                str(name): (tuple(int(d) for d in shape), str(dtype)) for name, (shape, dtype) in raw["state"].items()
            }
            return cls(
                list(raw["schedule"]) if isinstance(raw["schedule"], list) else raw["schedule"],
                list(raw["layer_ks"]),
                state,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise Rejection(f"the worker described the model in a malformed way ({type(e).__name__})") from None


def check_spec(spec: Spec, allow_uniform: bool) -> dict:
    """Schedule, layer k and budget of the fresh model; returns the parameter counts."""
    n, L = MODEL_CONFIG["n_layers"], MODEL_CONFIG["seq_len"]
    ks = spec.schedule
    if not isinstance(ks, list) or len(ks) != n or not all(isinstance(k, int) and 1 <= k <= L for k in ks):
        raise Rejection(f"layer_k_schedule({n}, {L}) returned {ks!r}: expected {n} ints in [1, {L}]")
    if not allow_uniform and len(set(ks)) == 1:
        raise Rejection(f"layer_k_schedule gives every layer k={ks[0]}: the schedule must adapt k per layer")
    if spec.layer_ks != ks:
        raise Rejection(
            f"the layers' k are {spec.layer_ks} but layer_k_schedule says {ks}: build layers from the schedule"
        )
    missing = [name for name in FIXED_WEIGHTS if name not in spec.state]
    if missing:
        raise Rejection(f"the model has no {missing[0]}: keep the fixed embedding and LM head")
    fixed_shape = (MODEL_CONFIG["vocab_size"], MODEL_CONFIG["d_model"])
    for name in FIXED_WEIGHTS:  # with the budget below, this bounds what the judge will receive
        if tuple(spec.state[name][0]) != fixed_shape:
            raise Rejection(f"{name} is {tuple(spec.state[name][0])}, not {fixed_shape}: keep the fixed model")
    nonembed = sum(math.prod(shape) for name, (shape, _) in spec.state.items() if name not in FIXED_WEIGHTS)
    indexer = sum(math.prod(shape) for name, (shape, _) in spec.state.items() if ".indexer." in name)
    if nonembed > MAX_NONEMBED_PARAMS:
        raise Rejection(
            f"{nonembed:,} non-embedding parameters and buffers, over the budget of "
            f"{MAX_NONEMBED_PARAMS:,}: make the indexer smaller"
        )
    return dict(nonembed_params=float(nonembed), indexer_params=float(indexer))


def check_snapshot(raw: bytes, spec: Spec) -> dict:
    """The trained weights, parsed without running code (safetensors), exactly as the spec declares."""
    from safetensors.torch import load

    try:
        weights = load(raw)
    except Exception as e:
        raise Rejection(f"the trained weights are not a valid safetensors file ({type(e).__name__})") from None
    got = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in weights.items()}
    if got != spec.state:
        extra = sorted(set(got) - set(spec.state))
        lost = sorted(set(spec.state) - set(got))
        changed = sorted(n for n in set(got) & set(spec.state) if got[n] != spec.state[n])
        what = (
            f"{extra[0]} is not a weight of a fresh model"
            if extra
            else f"{lost[0]} is missing"
            if lost
            else f"{changed[0]} is {got[changed[0]]}, a fresh model declares {spec.state[changed[0]]}"
        )
        raise Rejection(
            f"the trained weights differ from what a freshly built model declares ({what}): keep every "
            f"trained value in the model's parameters and buffers"
        )
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise Rejection(f"the trained weight {name} holds NaN or inf: keep the training stable")
    return weights


def expected_snapshot_bytes(spec: Spec) -> int:
    sizes = dict(float64=8, float32=4, float16=2, bfloat16=2, int64=8, int32=4, int16=2, int8=1, uint8=1, bool=1)
    return sum(math.prod(shape) * sizes.get(dtype, 8) for shape, dtype in spec.state.values()) + SNAPSHOT_SLACK


# ---------------------------------------------------------------------------------------------
# Serving


class Server(Worker):
    """A worker that builds a fresh model (started while the training runs), loads the trained weights
    and answers forward passes."""

    def __init__(self, job, name, deadline, threads, on_line=None):
        super().__init__(job, name, deadline, threads, on_line=on_line)
        self.send("starting", dict(mode="serve", code=job.code, seed=job.seed, device=job.device, threads=threads))
        self.layers = None
        self.logits_buffer = None  # reused by every answer of the same shape

    def load(self, weights: bytes, spec: Spec):
        served = Spec.parse(self.receive_ok("building a fresh model").get("spec"))
        if served != spec:
            raise Rejection(
                "a fresh import of the program builds another model than the one that was trained: "
                "the model must not depend on anything but the code"
            )
        self.send("loading the trained weights", dict(op="load", snapshot_bytes=len(weights)), weights)
        self.receive_ok("loading the trained weights")
        self.layers = len(spec.layer_ks)

    def ask(self, tokens: torch.Tensor):
        B, T = tokens.shape
        self.send(
            "a forward pass", dict(op="forward", shape=[B, T]), tokens.to(torch.int64).numpy().astype("<i8").tobytes()
        )

    def answer(self, tokens_shape):
        """The logits (a view of this server's buffer: valid until its next answer) and selections."""
        B, T = tokens_shape
        self.receive_ok("a forward pass")
        self.logits_buffer = self.talk(
            "a forward pass",
            lambda: self.channel.receive_array((B, T, VOCAB_SIZE), np.float32, into=self.logits_buffer),
        )
        logits = torch.from_numpy(self.logits_buffer)
        selections = torch.from_numpy(
            self.talk("a forward pass", lambda: self.channel.receive_array((self.layers, B, T, T), np.uint8))
        )
        if not torch.isfinite(logits).all():
            raise Rejection("logits contain NaN or inf: keep every score finite")
        if selections.max() > 1:
            raise Rejection("selections must be boolean")
        return logits, selections.bool()

    def forward(self, tokens):
        self.ask(tokens)
        logits, selections = self.answer(tokens.shape)
        return logits.clone(), selections


def check_behaviour(servers: list[Server], ks, token_sets: dict):
    """The behavioural probes, one token set per server, side by side (each server has its own
    thread of the machine; the judge mostly waits on pipes)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(token_sets)) as pool:
        failures = list(
            pool.map(
                lambda job: probes.probe(job[0].forward, ks, job[1], VOCAB_SIZE), zip(servers, token_sets.values())
            )
        )
    for what, failure in zip(token_sets, failures):
        if failure:
            raise Rejection(f"{what}: {failure}")


@dataclass
class Item:
    window: int  # index of the validation window it comes from
    tokens: torch.Tensor  # [T]
    cut: int | None = None  # a checked copy: equal to the window up to `cut`, other text after it
    server: int = 0


def windows_to_run(n_scored: int) -> int:
    """Scored windows plus the unscored ones that give the cut checks their MIN_CHECKED windows."""
    return max(n_scored, MIN_CHECKED)


def checked_windows(n_windows: int) -> int:
    return min(n_windows, max(MIN_CHECKED, round(CHECKED_SHARE * n_windows)))


def cut_position(j: int, T: int, ks, rng: np.random.Generator) -> int:
    """Where checked copy j is cut: every other cut anywhere, the others where some layer's selection
    is a choice (query t with t + 1 > k), the only places a leak through top-k can show."""
    choice_from = min(int(k) for k in ks)
    if j % 2 and choice_from <= T - 2:
        return int(rng.integers(choice_from, T - 1))
    return int(rng.integers(T - 1))


def plan_validation(windows: torch.Tensor, batch_size: int, ks, rng: np.random.Generator) -> list[list[Item]]:
    """The items each of the two servers gets, shuffled: every window once (half of them, at random,
    on each server), checked copies on the other server than their window, padding (repeats of the
    server's own windows) so that every batch has batch_size rows.

    A window must never reach the server that runs its copies, not even as padding: a model that
    remembers inputs would answer the copies from it and hide a peek ahead."""
    N, T = windows.shape[0], windows.shape[1] - 1
    if N < 2:
        raise ValueError("validation needs at least two windows (one on each server)")
    inputs = windows[:, :-1]
    servers = (np.arange(N) % 2)[rng.permutation(N)]
    reals = [Item(i, inputs[i], server=int(servers[i])) for i in range(N)]
    copies = []
    for j, i in enumerate(rng.choice(N, size=checked_windows(N), replace=False)):
        i, p = int(i), cut_position(j, T, ks, rng)
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
            items.append(Item(pad.window, pad.tokens, cut=-1, server=s))  # a repeat: must match too
        rng.shuffle(items)
    return [[items[i : i + batch_size] for i in range(0, len(items), batch_size)] for items in per_server]


def validate(servers: list[Server], windows: torch.Tensor, n_scored: int, batch_size: int, ks, rng) -> dict:
    """Loss, accuracy and density over every predicted token of the first n_scored windows, computed
    here from the servers' logits; every checked copy and repeat must reproduce its window's logits
    up to its cut."""
    batches = plan_validation(windows, batch_size, ks, rng)
    targets = windows[:, 1:]
    T = targets.shape[1]
    full = {}  # window -> its logits in full (kept only for windows that copies compare against)
    pending = {}  # window -> [(cut, logits up to cut)] copies that came before their window
    checked = {item.window for per in batches for batch in per for item in batch if item.cut is not None}
    loss_sums, correct, densities = [], 0, []
    for r in range(max(len(b) for b in batches)):
        asked = [(s, batches[s][r]) for s in (0, 1) if r < len(batches[s])]
        for s, batch in asked:
            servers[s].ask(torch.stack([item.tokens for item in batch]))
        for s, batch in asked:
            logits, selections = servers[s].answer((len(batch), T))
            if problem := probes.selection_violation(selections, ks):  # in every batch, not just the probes
                raise Rejection(f"during validation: {problem}")
            for row, item in enumerate(batch):
                if item.cut is None and item.window < n_scored:
                    loss_sums.append(
                        F.cross_entropy(logits[row].double(), targets[item.window], reduction="sum").item()
                    )
                    correct += int((logits[row].argmax(-1) == targets[item.window]).sum())
                    densities.append(probes.density(selections[:, row : row + 1]))
                if item.cut is None:
                    if item.window in checked:
                        full[item.window] = logits[row].clone()
                        for cut, copy in pending.pop(item.window, []):
                            compare(copy, logits[row], cut)
                else:
                    upto = T - 1 if item.cut == -1 else item.cut
                    if item.window in full:
                        compare(logits[row], full[item.window], upto)
                    else:
                        pending.setdefault(item.window, []).append((upto, logits[row][: upto + 1].clone()))
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


def clamped_ppl(val_loss: float) -> float:
    """exp(val_loss) within [1, PPL_CAP]: the score's range, whatever the logits were."""
    return min(PPL_CAP, math.exp(min(max(val_loss, 0.0), math.log(PPL_CAP))))


def compare(copy_logits, window_logits, upto):
    moved = probes.first_moved(copy_logits, window_logits, upto)
    if moved:
        raise Rejection(
            f"during validation: {probes.leak_message(upto, *moved)} (a copy of a validation window "
            f"cut after position {upto} and run by another process gave other logits)"
        )


# ---------------------------------------------------------------------------------------------
# A stage


def run_stage(job: Job, corpus, on_line=None) -> StageResult:
    """Run one stage under the job's time limit; always returns, never leaves a process behind."""
    start = time.monotonic()
    deadline = start + job.time_limit
    metrics, workers = {}, []
    log = on_line or (lambda line: None)
    torch.set_num_threads(max(1, job.threads // 2))  # the judge's own arithmetic shares the cores with its workers
    try:
        profile = get_profile(job.profile)
        steps = STAGE1_TRAINING_STEPS if job.stage == 1 else profile.steps
        n_windows = STAGE1_WINDOWS if job.stage == 1 else job.val_windows
        windows = val_windows(corpus.val, windows_to_run(n_windows), profile.seq_len)
        trainer = start_training(job, corpus, steps, deadline, workers, on_line)
        threads = max(1, job.threads // 2)  # the two servers run side by side
        servers = [Server(job, f"validation {name}", deadline, threads, on_line) for name in ("A", "B")]
        workers += servers  # they import and build while the training runs
        weights, spec, losses, train_seconds = finish_training(trainer, steps, metrics, job)
        if job.stage == 1:
            first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
            if not last < first:
                raise Rejection(
                    f"the training loss did not fall in {steps} steps ({first:.3f} -> {last:.3f}): "
                    f"the model does not learn"
                )
            metrics["train_loss"] = last
        else:
            tail = losses[-max(1, len(losses) // 10) :]
            metrics["train_loss"] = sum(tail) / len(tail)  # mean over the last 10% of steps
        metrics["train_seconds"] = train_seconds

        for server in servers:
            server.load(weights, spec)
        rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))  # an order the child cannot predict
        random_tokens = torch.from_numpy(rng.integers(0, VOCAB_SIZE, (profile.batch_size, profile.seq_len)))
        train_text = next(train_batches(corpus.train, profile.batch_size, profile.seq_len, job.seed))[:, :-1]
        log("checking behaviour (causality, selection, batch independence, no state)")
        check_behaviour(servers, spec.layer_ks, {"on random tokens": random_tokens, "on training text": train_text})
        if job.stage == 2:
            metrics["stage1_passed"] = 1.0  # every check of stage 1 held; what fails from here is stage 2's own
        log(
            f"validating on {n_windows} windows ({len(windows)} run), {checked_windows(len(windows))} of them "
            f"re-run cut by the other process"
        )
        metrics.update(validate(servers, windows, n_windows, profile.batch_size, spec.layer_ks, rng))
        return StageResult(ok=True, metrics=metrics, stderr=_stderr(workers), seconds=time.monotonic() - start)
    except Rejection as e:
        return StageResult(
            ok=False, failure=str(e), metrics=metrics, stderr=_stderr(workers), seconds=time.monotonic() - start
        )
    except wire.Deadline:
        return StageResult(
            ok=False,
            failure=f"took more than {job.time_limit_reason}; the whole sandbox was killed: "
            f"make it faster or stop looping",
            metrics=metrics,
            stderr=_stderr(workers),
            seconds=time.monotonic() - start,
            retry_later=True,
        )
    except (CorpusError, SandboxUnavailable) as e:
        return StageResult.infrastructure_failure(f"{type(e).__name__}: {e}")
    except Exception as e:  # whatever a worker's answer did to the judge's arithmetic: the program's failure
        return StageResult(
            ok=False,
            failure=f"the judge could not use the program's answers: {first_line(e)}",
            metrics=metrics,
            stderr=_stderr(workers),
            seconds=time.monotonic() - start,
        )
    finally:
        for worker in workers:
            worker.close()


def start_training(job: Job, corpus, steps, deadline, workers, on_line) -> Worker:
    """The training worker, with the train split (and nothing else of the data) in its view."""
    binds = {str(corpus.dir / "train.bin"): TRAIN_FILE_INSIDE}
    trainer = Worker(job, "training", deadline, job.threads, binds=binds, on_line=on_line)
    workers.append(trainer)
    profile = get_profile(job.profile)
    train_path = trainer.process.path_inside(str(corpus.dir / "train.bin"))
    trainer.send(
        "starting",
        dict(
            mode="train",
            code=job.code,
            seed=job.seed,
            device=job.device,
            threads=job.threads,
            steps=steps,
            batch_size=profile.batch_size,
            seq_len=profile.seq_len,
            train_path=train_path,
            check_every=job.check_every,
        ),
    )
    return trainer


def finish_training(trainer: Worker, steps, metrics, job: Job):
    """The fresh model's spec first (checked before it trains), then the losses and the weights."""
    spec = Spec.parse(trainer.receive_ok("building the model").get("spec"))
    metrics.update(check_spec(spec, job.allow_uniform_schedule))
    done = trainer.receive_ok("training")
    try:
        n = int(done["snapshot_bytes"])
        losses = [float(x) for x in done["losses"]]
        train_seconds = float(done["train_seconds"])
    except (KeyError, TypeError, ValueError):
        raise Rejection("the training process answered in a malformed way") from None
    if not 0 < n <= expected_snapshot_bytes(spec):
        raise Rejection(
            f"the training process announced {n} bytes of weights; the model declares at most "
            f"{expected_snapshot_bytes(spec)}"
        )
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        raise Rejection(f"the training process reported {len(losses)} losses for {steps} steps")
    raw = trainer.talk("sending the trained weights", lambda: trainer.channel.receive_bytes(n))
    trainer.close()
    check_snapshot(raw, spec)
    return raw, spec, losses, train_seconds


def _stderr(workers) -> str:
    return "\n".join(f"[{w.name}]\n{w.process.stderr_text()}" for w in workers if w.process.stderr_text().strip())
