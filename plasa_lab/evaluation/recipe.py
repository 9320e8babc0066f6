"""The training recipe in one process: the judge's own trunk loop (plasa_lab.evaluation.sandboxed.trunk.train) with the
program's blocks answered here instead of by a sandboxed blocks process.

For benchmarks and tests only: the bare cost of the recipe (scripts/bench_eval.py's reference) and
the check that the judge's processes, pipes and sandbox change nothing the recipe computes. The
judge never uses it: it keeps block code out of the trunk's process.
"""

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import INITIAL_PROGRAM
from ..data.tokens import train_batches, val_windows
from .sandboxed.trunk import Selections, build_trunk, compile_fixed_parts, forward_with, train


class InProcessBlocks:
    """A blocks link (select / attention / step) answered by the program's blocks in this process."""

    def __init__(self, code: str, seed: int, device: torch.device, training: bool):
        from .sandboxed.worker import Blocks, IndexerTraining

        with tempfile.TemporaryDirectory() as folder:  # Blocks writes the program to import it
            here = os.getcwd()
            os.chdir(folder)
            try:
                self.blocks = Blocks(dict(code=code, seed=seed, device=device.type))
            finally:
                os.chdir(here)
        self.schedule = list(self.blocks.schedule)
        self.training = IndexerTraining(self.blocks) if training else None
        self.blocks.indexers.train(training)

    def select(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        kept = self.blocks.select(layer, x.detach().float(), self.training is not None)
        return torch.from_numpy(kept)

    def attention(self, layer: int, attn_probs: torch.Tensor):
        self.blocks.attention(layer, attn_probs.detach().float())

    def step(self):
        self.training.step()


@dataclass
class RecipeRun:
    losses: list[float]  # the LM loss of every step
    train_seconds: float
    val_loss: float
    val_seconds: float
    fixed_step: str = "eager"  # or what compile_fixed_parts did


def train_and_score(
    code: str, train_tokens, val_tokens, profile, seed: int, device, n_windows=None, compiler=False
) -> RecipeRun:
    """Train a program by the recipe in this process, then score n_windows validation windows once
    (no checks): the numbers a judged evaluation must reproduce, at the recipe's bare cost.
    `compiler`: False (eager), True (torch.compile) or a function standing in for torch.compile."""
    device = torch.device(device)
    link = InProcessBlocks(code, seed, device, training=True)
    selections = Selections(link.schedule, device)
    torch.manual_seed(seed)  # the trunk's initialisation, as the judge seeds it
    model = build_trunk(INITIAL_PROGRAM.read_text(), selections)
    fixed_step = compile_fixed_parts(model, device, None if compiler is True else compiler) if compiler else "eager"
    batches = train_batches(np.asarray(train_tokens), profile.batch_size, profile.seq_len, seed)
    losses, train_seconds = train(model, selections, link, batches, profile.steps, device, seed, profile.steps)

    forward = forward_with(model, selections, lambda server: link, device)
    link.training = None
    link.blocks.indexers.eval()
    n = n_windows or profile.val_windows
    windows = val_windows(np.asarray(val_tokens), n, profile.seq_len)
    start, total = time.perf_counter(), 0.0
    for batch in windows.split(profile.batch_size):
        (token_loss, _), _ = forward(batch[:, :-1], 0, None, batch[:, 1:])
        total += token_loss.double().sum().item()
    val_loss = total / windows[:, 1:].numel()
    return RecipeRun(losses, train_seconds, val_loss, time.perf_counter() - start, fixed_step)
