import collections
import os
import pathlib
import resource
import time


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (`make test JOBS=N`), give each worker and every process it
    starts its share of the cores (OMP_NUM_THREADS, read by torch when it loads, and
    inherited by the trainers the tests spawn): N workers each running torch on every core
    would oversubscribe them. A value the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


_share_cores_between_workers()  # before torch is imported below

import pytest  # noqa: E402
import torch  # noqa: E402

from rnope_megatron.model.config import ParallelLayout  # noqa: E402
from tests.support import close_rank_pools, free_port, init_megatron  # noqa: E402

# The test tiers (CONTRIBUTING.md, "Test tiers"): each file's tier, given here once rather
# than on every test. `make test` runs every tier; `make test-quick` the fast ones.
TIER_OF_FILE = {
    "unit": ("test_pattern", "test_config", "test_specs", "test_compat", "test_structure", "test_fp8_policy",
             "test_gpu_kit", "test_te_path", "test_docs"),
    "numeric": ("test_sliding_window", "test_native_cpu", "test_model_oracle", "test_flops_and_data",
                "test_document_mask"),
    "distributed": ("test_distributed", "test_context_parallel", "test_checkpoint_layout"),
    "cli": ("test_train", "test_recipe", "test_crash_safety", "test_cli", "test_convert_output", "test_convert",
            "test_eval", "test_plan", "test_plan_memory", "test_slurm_kit", "test_benchmarks", "test_recipe_catalog",
            "test_wandb_logging", "test_reliability_outputs", "test_reliability_runs", "test_convert_llama",
            "test_train_documents"),
    "slow": ("test_quantize", "test_reproduction"),
}
TIERS = tuple(TIER_OF_FILE)

# `make test` runs files on pytest-xdist workers, one per core (--dist loadfile: a file's
# module fixtures, e.g. trained models, are built once, on one worker). Starting the longest files
# first keeps one worker from ending alone on a long file. Order from `pytest --durations`
# on 2 cores; a file not listed starts after these.
LONGEST_FILES_FIRST = (
    "test_reproduction", "test_train", "test_crash_safety", "test_reliability_runs", "test_reliability_outputs",
    "test_quantize", "test_train_documents", "test_convert", "test_eval", "test_benchmarks", "test_recipe_catalog",
    "test_convert_output", "test_plan", "test_cli", "test_convert_llama", "test_context_parallel",
)

# The finished run `saved_run` holds: tests that compare against it train with these too.
SAVED_RUN_ARGS = ["train.iters=4", "checkpoint.interval=2", "scheduler.warmup_iters=1"]


def pytest_collection_modifyitems(config, items):
    """Give each test its file's tier unless it names one itself (a slow test in a fast
    file carries ``@pytest.mark.slow``); a file in no tier is an error, so a new file
    cannot slip out of ``make test-quick``'s selection unnoticed. Then order the files
    longest first (LONGEST_FILES_FIRST)."""
    tier_of = {name: tier for tier, names in TIER_OF_FILE.items() for name in names}
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        stem = pathlib.Path(str(item.fspath)).stem
        if stem not in tier_of:
            raise pytest.UsageError(f"{stem}.py has no test tier: add it to TIER_OF_FILE in tests/conftest.py")
        item.add_marker(getattr(pytest.mark, tier_of[stem]))
    rank = {stem: i for i, stem in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(pathlib.Path(str(item.fspath)).stem, len(rank)))  # stable: file order kept

# Per tier: tests, wall seconds, CPU seconds of this process and every subprocess it
# waited for (the trainers' workers included): what `make test` prints at the end, so a
# change to the suite's time is measured per tier, not guessed.
_TIER_TIME = collections.defaultdict(lambda: [0, 0.0, 0.0])


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.monotonic(), _cpu_seconds()
    yield
    tier = next((tier for tier in TIERS if item.get_closest_marker(tier)), "none")
    row = _TIER_TIME[tier]
    row[0] += 1
    row[1] += time.monotonic() - wall
    row[2] += _cpu_seconds() - cpu


def pytest_sessionfinish(session):
    """End the multi-process tests' rank pools (tests/support.py), and hand a pytest-xdist
    worker's counts to the controller (pytest_testnodedown). The pooled ranks' CPU time
    counts once they are waited for, here: it goes to the tier of the tests using them."""
    cpu = _cpu_seconds()
    if close_rank_pools():
        _TIER_TIME["distributed"][2] += _cpu_seconds() - cpu
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["tier_time"] = {tier: list(row) for tier, row in _TIER_TIME.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for tier, counts in getattr(node, "workeroutput", {}).get("tier_time", {}).items():
        _TIER_TIME[tier] = [mine + theirs for mine, theirs in zip(_TIER_TIME[tier], counts)]


def pytest_terminal_summary(terminalreporter):
    """The time per tier; under pytest-xdist the workers' sums (wall: time a worker spent
    in the tier's tests, added over workers)."""
    if not _TIER_TIME:
        return
    write = terminalreporter.write_line
    terminalreporter.section("time per tier")
    write(f"{'tier':12s} {'tests':>6s} {'wall min':>9s} {'CPU min':>8s}")
    for tier in (*TIERS, "none"):
        if tier in _TIER_TIME:
            count, wall, cpu = _TIER_TIME[tier]
            write(f"{tier:12s} {count:6d} {wall / 60:9.1f} {cpu / 60:8.1f}")
    total = [sum(column) for column in zip(*_TIER_TIME.values())]
    write(f"{'all':12s} {total[0]:6d} {total[1] / 60:9.1f} {total[2] / 60:8.1f}")


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
