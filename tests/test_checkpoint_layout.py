"""The checkpoint directory format on its own: pruning after a rollback, and a failure on
one rank reaching every rank (no rank waits at a barrier for a save that failed)."""

import json

from rnope_megatron.checkpoint import layout
from tests.support import run_distributed
from tests.workers import save_failing_on_rank0


def _complete(directory, iteration):
    path = directory / layout.iteration_dir_name(iteration)
    path.mkdir(parents=True)
    (path / "shard").write_bytes(b"x" * 8)
    (path / layout.MANIFEST).write_text(json.dumps({"iteration": iteration, "files": {"shard": 8}}))
    return path


def test_pruning_after_a_rollback_keeps_the_new_checkpoint(tmp_path):
    """`latest` pointed back at iter_40 (as our error messages suggest) and the run saved
    iter_45: it and the one before it stay; iter_50 and iter_60 belong to the abandoned
    history and are not touched (the newest-by-number rule once deleted iter_45)."""
    for iteration in (30, 40, 45, 50, 60):
        _complete(tmp_path, iteration)
    (tmp_path / "iter_0000047.tmp").mkdir()
    layout._prune(tmp_path, keep=2, current=45)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000040", "iter_0000045", "iter_0000050", "iter_0000060"]
    layout._prune(tmp_path, keep=1, current=45)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000045", "iter_0000050", "iter_0000060"]


def test_a_failure_on_rank_0_reaches_every_rank(tmp_path):
    messages = run_distributed(save_failing_on_rank0, 2, str(tmp_path), fresh=True)  # it patches the layout module
    assert messages[0] == messages[1]
    assert "no space left on device while writing checkpoint" in messages[0]
    assert "'latest' names iter_0000001" in messages[0]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]
