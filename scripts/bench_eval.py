"""Harness overhead: seconds per training step of the sandboxed harness against a bare loop.

Both train the initial program with the same optimiser, batches and thread count, in one run;
the reference has no sandbox, no probes, no checks. Ends with `ratio: X.XXX` (harness / reference).

    python scripts/bench_eval.py [--profile quick|smoke|full] [--program initial_program.py]
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from plasa_lab import INITIAL_PROGRAM, data
from plasa_lab.evaluation import Settings, evaluate_code
from plasa_lab.profiles import GRAD_CLIP, OPTIMIZER, VOCAB_SIZE, get_profile
from plasa_lab.program import load_program


def reference_seconds_per_step(program, corpus, profile, threads, seed=42):
    """The bare loop: build, AdamW (fused), LM loss + aux_loss, clip, step. Nothing else."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = load_program(program).build_model(VOCAB_SIZE).train()
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER, fused=True)
    batches = data.train_batches(corpus.train, profile.batch_size, profile.seq_len, seed)
    start = time.perf_counter()
    for _ in range(profile.steps):
        batch = next(batches)
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out["logits"].flatten(0, 1), batch[:, 1:].flatten()) + out.get("aux_loss", 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
    return (time.perf_counter() - start) / profile.steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"])
    parser.add_argument("--program", default=str(INITIAL_PROGRAM))
    args = parser.parse_args()
    try:
        code = open(args.program).read()
    except OSError as e:
        parser.exit(2, f"bench_eval.py: error: {args.program}: {e.strerror}\n")
    profile = get_profile(args.profile)
    settings = Settings(profile=profile.name, device="cpu", ledger="")
    corpus = data.prepare_corpus(settings.corpus, log=lambda m: print(m, file=sys.stderr))
    print(f"{profile.steps} steps, batch {profile.batch_size} x {profile.seq_len}, {settings.threads} threads", flush=True)

    reference = reference_seconds_per_step(args.program, corpus, profile, settings.threads)
    print(f"reference loop:     {reference:.4f} s/step", flush=True)
    start = time.perf_counter()
    evaluation = evaluate_code(code, 2, settings)
    wall = time.perf_counter() - start
    if "failure" in evaluation.artifacts:
        sys.exit(f"bench_eval.py: the harness rejected the program: {evaluation.artifacts['failure']}")
    harness = evaluation.metrics["train_seconds"] / profile.steps
    print(f"sandboxed harness:  {harness:.4f} s/step (stage 2 wall time {wall:.1f} s, val_ppl "
          f"{evaluation.metrics['val_ppl']:.1f})")
    print(f"ratio: {harness / reference:.3f}")


if __name__ == "__main__":
    main()
