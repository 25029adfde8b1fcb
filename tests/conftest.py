import pytest
import torch

from rnope_megatron.config import ParallelLayout
from tests.support import free_port, init_megatron

# The finished run `saved_run` holds: tests that compare against it train with these too.
SAVED_RUN_ARGS = ["train.iters=4", "checkpoint.interval=2", "scheduler.warmup_iters=1"]


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


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory, data_cache):
    """A finished 4-iteration run (tests/trainer.py FAST + SAVED_RUN_ARGS) with
    checkpoints at 2 and 4, shared by the session: copy it before damaging it."""
    from tests.trainer import train

    run_dir = tmp_path_factory.mktemp("saved")
    train(run_dir, f"data.cache_dir={data_cache}", *SAVED_RUN_ARGS)
    return run_dir


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
