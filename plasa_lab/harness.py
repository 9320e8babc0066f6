"""The trusted harness: runs inside the sandbox and turns one child program into metrics.

    python -I -m plasa_lab.harness JOB.json RESULT.json

The child supplies only a model. The harness owns the data, the budget, the optimiser, the
loss and the metric; it binds every function it scores with before the child's code is
imported, measures density from the selections itself, and writes its verdict to RESULT.json
(the parent never parses the child's prints).
"""

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data, probes
from .profiles import GRAD_CLIP, MAX_NONEMBED_PARAMS, MODEL_CONFIG, OPTIMIZER, PROFILES, VOCAB_SIZE
from .program import load_program

# Bound before any child code runs: the child cannot swap what the harness scores with.
_cross_entropy = F.cross_entropy
_clip_grad_norm = torch.nn.utils.clip_grad_norm_
_AdamW = torch.optim.AdamW

SMOKE_TRAINING_STEPS = 12
PROGRESS_EVERY = 50
SPOT_CHECK_CUTS = 3  # causality cuts per spot-checked validation batch


class Rejection(Exception):
    """The child broke a rule; the message is the one-line failure."""


def _program_line(exc: BaseException, program: str):
    """The last line of the child's file in the exception's traceback, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == program]
    return frames[-1].lineno if frames else None


def _describe(exc: BaseException, program: str, doing: str):
    line = _program_line(exc, program)
    where = f" at line {line} of the program" if line else ""
    message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{doing}: {type(exc).__name__}{where}: {message}".rstrip(": ")


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checks on the built model (shared by both stages, before and after training)

def check_model_config(module):
    got = getattr(module, "MODEL_CONFIG", None)
    if got != MODEL_CONFIG:
        raise Rejection(f"MODEL_CONFIG is {got}, must stay {MODEL_CONFIG}")


def build(module, seed, device):
    if not callable(getattr(module, "build_model", None)):
        raise Rejection("the program defines no build_model(vocab_size) function")
    torch.manual_seed(seed)
    model = module.build_model(VOCAB_SIZE)
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "plasa_layers", None)):
        raise Rejection("build_model() must return a torch.nn.Module with a plasa_layers() method")
    layers = list(model.plasa_layers())
    if len(layers) != MODEL_CONFIG["n_layers"]:
        raise Rejection(f"plasa_layers() returned {len(layers)} layers, expected {MODEL_CONFIG['n_layers']}")
    return model.to(device)


def parameter_counts(model):
    """(non-embedding parameters, indexer parameters): embedding and LM head are fixed and excluded."""
    params = {id(p): p.numel() for p in model.parameters()}
    fixed = {id(model.embed.weight), id(model.lm_head.weight)}
    nonembed = sum(n for i, n in params.items() if i not in fixed)
    indexer = sum(p.numel() for layer in model.plasa_layers() for p in layer.indexer.parameters())
    return nonembed, indexer


def check_budget(model):
    nonembed, indexer = parameter_counts(model)
    if nonembed > MAX_NONEMBED_PARAMS:
        raise Rejection(f"{nonembed:,} non-embedding parameters, over the budget of {MAX_NONEMBED_PARAMS:,}: "
                        f"make the indexer smaller")
    return nonembed, indexer


def check_schedule(module, model, allow_uniform):
    n, L = MODEL_CONFIG["n_layers"], MODEL_CONFIG["seq_len"]
    ks = module.layer_k_schedule(n, L)
    if not isinstance(ks, (list, tuple)) or len(ks) != n or not all(isinstance(k, int) and 1 <= k <= L for k in ks):
        raise Rejection(f"layer_k_schedule({n}, {L}) returned {ks!r}: expected {n} ints in [1, {L}]")
    if not allow_uniform and len(set(ks)) == 1:
        raise Rejection(f"layer_k_schedule gives every layer k={ks[0]}: the schedule must adapt k per layer")
    layer_ks = [getattr(layer, "k", None) for layer in model.plasa_layers()]
    if layer_ks != list(ks):
        raise Rejection(f"the layers' k are {layer_ks} but layer_k_schedule says {list(ks)}: build layers from the schedule")
    return list(ks)


def run_probes(model, tokens, what):
    failure = probes.probe_model(model, tokens, VOCAB_SIZE)
    if failure:
        raise Rejection(f"{what}: {failure}")


# ---------------------------------------------------------------------------------------------
# Training and validation

def make_optimizer(model, device):
    fused = device.type in ("cpu", "cuda")
    return _AdamW(model.parameters(), **OPTIMIZER, fused=fused)


def lm_loss_and_aux(model, batch):
    out = model(batch[:, :-1])
    logits = out["logits"] if isinstance(out, dict) else None
    if not torch.is_tensor(logits) or logits.shape != (*batch[:, 1:].shape, VOCAB_SIZE):
        raise Rejection("model output must be a dict whose 'logits' have shape [B, T, vocab_size]")
    loss = _cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    aux = out.get("aux_loss")
    if aux is not None and (not torch.is_tensor(aux) or aux.numel() != 1):
        raise Rejection("aux_loss must be a scalar tensor")
    return loss, aux


def train(model, batches, steps, device):
    """The fixed recipe: AdamW, grad clip, LM loss + the child's aux_loss. Returns per-step LM losses."""
    optimizer = make_optimizer(model, device)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches).to(device, non_blocking=True)
        loss, aux = lm_loss_and_aux(model, batch)
        total = loss if aux is None else loss + aux.reshape(())
        if not torch.isfinite(total):
            what = "LM loss" if not torch.isfinite(loss) else "aux_loss"
            raise Rejection(f"training {what} became {total.item()} at step {step}: keep the training signal finite")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        _clip_grad_norm(model.parameters(), GRAD_CLIP)
        optimizer.step()
        losses.append(loss.item())
        if step % PROGRESS_EVERY == 0 or step == steps:
            elapsed = time.perf_counter() - start
            log(f"step {step}/{steps} loss {loss.item():.4f} ({elapsed / step:.3f} s/step)")
    return losses


def validate(model, windows, batch_size, device):
    """Mean loss and accuracy over every predicted token of the windows; density from selections.

    The child cannot tell validation from probing: batches come in an order it cannot predict
    (a window it cached is random context, not the text before), and a random tenth of them
    (at least two) also go through the causality probe at SPOT_CHECK_CUTS random cuts, against
    the very logits that were scored. Several cuts, because a leak through the top-k selection
    cannot show at a cut before the sparse layers' k (there every causal key is selected anyway).
    Sums are exact (math.fsum), so the order does not change the result."""
    model.eval()
    rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    starts = range(0, len(windows), batch_size)
    order = torch.randperm(len(starts), generator=rng).tolist()
    spot_checked = set(order[:max(2, len(starts) // 10)])
    losses, correct, count, densities = [], 0, 0, []
    with torch.no_grad():
        for i in order:
            batch = windows[starts[i]:starts[i] + batch_size].to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(inputs)["logits"].float()
            if not torch.isfinite(logits).all():
                raise Rejection("validation logits contain NaN or inf: keep every score finite")
            losses.append(_cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").double().sum().item())
            correct += (logits.argmax(-1) == targets).sum().item()
            count += targets.numel()
            densities.append(measured_density(model))
            if i in spot_checked:
                cuts = torch.randperm(inputs.shape[1] - 1, generator=rng)[:SPOT_CHECK_CUTS].tolist()
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
                failure = probes.causality_violation(model, inputs, cuts, VOCAB_SIZE, seed=seed, base=logits)
                if failure:
                    raise Rejection(f"during validation: {failure}")
    val_loss = math.fsum(losses) / count
    return dict(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 700.0)), val_acc=correct / count,
                density=math.fsum(densities) / len(densities))


def measured_density(model):
    """Mean over layers of (keys attended) / (causal keys available), from last_selection."""
    fractions = []
    for layer in model.plasa_layers():
        sel = layer.last_selection
        T = sel.shape[-1]
        fractions.append(sel.sum().item() / (sel.shape[0] * T * (T + 1) / 2))
    return sum(fractions) / len(fractions)


# ---------------------------------------------------------------------------------------------
# Stages

def prepare(job, metrics):
    """Everything both stages do first: data, import, build, budget, schedule, probes."""
    device = resolve_device(job["device"])
    torch.set_num_threads(job["threads"])
    corpus = data.load_corpus(Path(job["corpus_dir"]), job["fingerprint"])
    profile = PROFILES[job["profile"]]
    probe_tokens = data.val_windows(corpus.val, profile.batch_size, profile.seq_len)[:, :-1].to(device)
    random_tokens = torch.randint(0, VOCAB_SIZE, probe_tokens.shape, generator=torch.Generator().manual_seed(job["seed"]))
    program = os.path.abspath(job["program"])
    try:
        module = load_program(program)
    except BaseException as e:  # SyntaxError, ImportError, SystemExit, anything at import time
        raise Rejection(_describe(e, program, "importing the program failed"))
    check_model_config(module)
    model = build(module, job["seed"], device)
    metrics["nonembed_params"], metrics["indexer_params"] = check_budget(model)
    check_schedule(module, model, job.get("allow_uniform_schedule", False))
    run_probes(model, random_tokens.to(device), "on random tokens")
    run_probes(model, probe_tokens, "on validation tokens")
    metrics["density"] = measured_density(model)
    return module, model, corpus, profile, device, (random_tokens.to(device), probe_tokens)


def stage1(job, metrics):
    """Cheap screening: all checks, then a short training whose loss must be finite and falling."""
    module, model, corpus, profile, device, _ = prepare(job, metrics)
    batches = data.train_batches(corpus.train, profile.batch_size, profile.seq_len, job["seed"])
    start = time.perf_counter()
    losses = train(model, batches, SMOKE_TRAINING_STEPS, device)
    metrics["train_seconds"] = time.perf_counter() - start
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if not last < first:
        raise Rejection(f"the training loss did not fall in {SMOKE_TRAINING_STEPS} steps ({first:.3f} -> {last:.3f}): "
                        f"the model does not learn")
    metrics["train_loss"] = last
    windows = data.val_windows(corpus.val, profile.batch_size, profile.seq_len)
    metrics.update(validate(model, windows, profile.batch_size, device))


def stage2(job, metrics):
    """The benchmark: the profile's full training and validation, then the probes again."""
    module, model, corpus, profile, device, (random_tokens, probe_tokens) = prepare(job, metrics)
    metrics["stage1_passed"] = 1.0  # every check of stage 1 held; what fails from here is stage 2's
    batches = data.train_batches(corpus.train, profile.batch_size, profile.seq_len, job["seed"])
    log(f"training {profile.steps} steps ({profile.name} profile, seed {job['seed']}, {device.type})")
    start = time.perf_counter()
    losses = train(model, batches, profile.steps, device)
    metrics["train_seconds"] = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):]
    metrics["train_loss"] = sum(tail) / len(tail)  # mean over the last 10% of steps
    windows = data.val_windows(corpus.val, job["val_windows"], profile.seq_len)  # evaluation.validation_windows
    metrics.update(validate(model, windows, profile.batch_size, device))
    run_probes(model, random_tokens, "after training, on random tokens")
    run_probes(model, probe_tokens, "after training, on validation tokens")


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_job(job) -> dict:
    metrics, start = {}, time.perf_counter()
    try:
        (stage1 if int(job["stage"]) == 1 else stage2)(job, metrics)
        ok, failure = True, None
    except Rejection as e:
        ok, failure = False, str(e)
    except data.CorpusError as e:
        ok, failure = False, f"corpus: {e}"
    except BaseException as e:  # the child's code raised while training or probing
        ok, failure = False, _describe(e, os.path.abspath(job["program"]), f"stage {job['stage']}")
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return dict(ok=ok, failure=failure, metrics=finite, seconds=time.perf_counter() - start)


def main(argv=None):
    job_path, result_path = (argv or sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text())
    result = run_job(job)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main()
