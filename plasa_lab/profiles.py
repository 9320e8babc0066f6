"""Moved to plasa_lab.constants (kept until replay.py imports from there)."""

from .constants import DEFAULT_SEED, GRAD_CLIP, MAX_NONEMBED_PARAMS, MODEL_CONFIG, OPTIMIZER, PPL_CAP, PROFILES, Profile, VOCAB_SIZE  # noqa: F401
from .constants import get_profile as _get_profile


def get_profile(name=None):
    import os
    return _get_profile(name or os.environ.get("PLASA_PROFILE") or "full")
