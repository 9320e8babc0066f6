import pytest
import torch

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import VOCAB_SIZE
from plasa_lab.program.blocks import load_program


@pytest.fixture(scope="session")
def program():
    """The initial program as a module (fresh per session; tests that change globals use their own)."""
    return load_program(INITIAL_PROGRAM)


@pytest.fixture
def random_tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB_SIZE, (2, 128), generator=g)
