"""Evaluation profiles (CONTRACT.md section 2) and the fixed training recipe."""

import os
from dataclasses import asdict, dataclass

DEFAULT_SEED = 42
VOCAB_SIZE = 49152
MODEL_CONFIG = dict(n_layers=4, d_model=128, n_heads=4, seq_len=128, vocab_size=VOCAB_SIZE, dropout=0.1)
OPTIMIZER = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
GRAD_CLIP = 1.0
MAX_NONEMBED_PARAMS = 2_000_000
PPL_CAP = 10_000.0


@dataclass(frozen=True)
class Profile:
    name: str
    steps: int
    batch_size: int
    seq_len: int
    val_batches: int

    def as_dict(self):
        return asdict(self)


PROFILES = {
    "full": Profile("full", steps=1000, batch_size=2, seq_len=128, val_batches=100),
    "quick": Profile("quick", steps=200, batch_size=2, seq_len=128, val_batches=20),
    "smoke": Profile("smoke", steps=20, batch_size=2, seq_len=128, val_batches=4),
}


def get_profile(name: str | None = None) -> Profile:
    """The named profile, else $PLASA_PROFILE, else `full`."""
    name = name or os.environ.get("PLASA_PROFILE") or "full"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
