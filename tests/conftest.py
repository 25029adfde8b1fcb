import pytest
import torch

from rnope_megatron.config import ParallelLayout
from tests.support import free_port, init_megatron


@pytest.fixture(scope="session")
def megatron_single():
    """One-process gloo group with Megatron's parallel state (TP=PP=CP=1)."""
    init_megatron(0, 1, free_port(), ParallelLayout())
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
