"""Deterministic fault points, for tests that kill or stop a real process at an exact
place instead of polling for it.

``RNOPE_FAULT=ACTION@POINT:ITERATION`` (comma-separated for several), e.g.
``kill@after_step:5`` (SIGKILL right after iteration 5's optimizer step and log line) or
``stop@after_save:2`` (SIGSTOP once checkpoint 2 is in place, so a test can look at the
process tree before killing it). Actions: ``kill``, ``stop``, ``term`` (SIGTERM to this process), ``term_group`` and
``usr1_group`` (SIGTERM / SIGUSR1 to the whole process group, as ``timeout``, ``kill --
-PGID`` or a scheduler does), ``kill_parent`` (SIGKILL to the parent process: ``kill -9``
of torchrun, from rank 0 at an exact point). Points: ``after_step``,
``mid_save`` (shards written, checkpoint not yet in place), ``after_save``, ``mid_output``
(a command's staged output half written: ITERATION counts documents for rnope-preprocess,
tensor groups for rnope-convert), ``building_data`` (iteration 0: rank 0 holds the data
cache's build lock), ``in_gate`` (after each forward of the eval gate due at that
iteration). Unset (the default) it does nothing.
"""

from __future__ import annotations

import os
import signal

ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "term_group": signal.SIGTERM,
           "usr1_group": signal.SIGUSR1, "kill_parent": signal.SIGKILL}
POINTS = ("after_step", "mid_save", "after_save", "mid_output", "building_data", "in_gate")


def _planned() -> list[tuple[str, str, int]]:
    spec = os.environ.get("RNOPE_FAULT", "").strip()
    plans = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            action, rest = item.split("@")
            point, iteration = rest.split(":")
            plans.append((action, point, int(iteration)))
        except ValueError:
            raise ValueError(f"RNOPE_FAULT: {item!r} is not ACTION@POINT:ITERATION") from None
        if action not in ACTIONS or point not in POINTS:
            raise ValueError(f"RNOPE_FAULT: {item!r}: actions {sorted(ACTIONS)}, points {POINTS}")
    return plans


def point(name: str, iteration: int) -> None:
    """Act here if ``RNOPE_FAULT`` asks for this point and iteration (rank 0 only)."""
    if "RNOPE_FAULT" not in os.environ or int(os.environ.get("RANK", "0")) != 0:
        return
    for action, where, when in _planned():
        if where == name and when == iteration:
            if action.endswith("_group"):
                os.killpg(os.getpgrp(), ACTIONS[action])
            elif action == "kill_parent":
                os.kill(os.getppid(), ACTIONS[action])
            else:
                os.kill(os.getpid(), ACTIONS[action])
