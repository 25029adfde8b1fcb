import pytest
import torch

from rnope_megatron.config import ParallelLayout
from tests.support import free_port, init_megatron


@pytest.fixture(scope="session")
def megatron_single():
    """One-process gloo group with Megatron's parallel state (TP=PP=CP=1)."""
    init_megatron(0, 1, free_port(), ParallelLayout())
    yield


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data cache (embedded corpus, retrieval mix, Megatron index files) for every
    trainer run of the session."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
