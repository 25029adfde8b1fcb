"""Scoring retrieval cases: exact match of the greedy answer.

A case is correct when greedy decoding after the prompt reproduces the answer's tokens
exactly. That is computed in one forward pass over ``prompt + answer`` (teacher forcing):
greedy decoding emits answer token k iff the argmax at the position before it is answer
token k *given the earlier answer tokens*; so "every teacher-forced argmax equals the
answer token" is the same event as "the greedy continuation starts with the answer", and
the first mismatch is where greedy decoding would have gone wrong. Ties in the argmax go
to the lowest token id (torch.argmax), as in greedy generation.

``token_accuracy`` (the share of answer tokens whose teacher-forced argmax is right) is
reported beside it as a diagnostic: it shows partial retrieval (e.g. 3 of 5 digits).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

# ids [batch, length] (int64) -> logits [batch, length, vocab] (any float dtype)
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def score_cases(logits_fn: LogitsFn, cases: list, batch_size: int = 1, after_batch=None) -> list[tuple[bool, float]]:
    """``(correct, token_accuracy)`` per case. Cases of one call must share one length.
    ``after_batch()`` (if given) is called after every forward: a caller that must be
    interruptible (a training-time gate under pre-emption) raises from it."""
    results = []
    for start in range(0, len(cases), max(1, batch_size)):
        chunk = cases[start:start + max(1, batch_size)]
        lengths = {len(c.ids) for c in chunk}
        if len(lengths) != 1:
            raise ValueError(f"cases of one batch must have one length, got {sorted(lengths)}")
        ids = torch.tensor([c.ids for c in chunk], dtype=torch.long)
        logits = logits_fn(ids)
        for row, case in enumerate(chunk):
            n = len(case.answer)
            # position p predicts token p + 1: the answer's tokens are predicted at L-n-1 .. L-2
            predicted = logits[row, len(case.ids) - n - 1:len(case.ids) - 1].argmax(dim=-1)
            hits = predicted.cpu() == torch.tensor(case.answer)
            results.append((bool(hits.all()), hits.double().mean().item()))
        if after_batch is not None:
            after_batch()
    return results


def evaluate_grid(logits_fn: LogitsFn, grid: dict, batch_size: int = 1, progress=None,
                  after_batch=None) -> list[dict]:
    """One row per (length, depth) cell of ``grid`` (from :func:`tasks.build_grid`)."""
    rows = []
    for (length, depth), cases in grid.items():
        started = time.time()
        scored = score_cases(logits_fn, cases, batch_size, after_batch)
        rows.append({
            "length": length, "depth": depth, "samples": len(scored),
            "accuracy": sum(ok for ok, _ in scored) / len(scored),
            "token_accuracy": sum(t for _, t in scored) / len(scored),
            "seconds": round(time.time() - started, 3),
        })
        if progress:
            progress(rows[-1])
    return rows


def by_length(rows: list[dict], key: str = "accuracy") -> dict[int, float]:
    """Mean of ``key`` over depths, per length (every cell has the same sample count)."""
    lengths = sorted({r["length"] for r in rows})
    return {n: sum(r[key] for r in rows if r["length"] == n) / sum(1 for r in rows if r["length"] == n)
            for n in lengths}


def default_batch_size(length: int, tokens_per_batch: int = 16384) -> int:
    """Enough rows to keep a CPU busy at short lengths, one row at long ones."""
    return max(1, tokens_per_batch // length)
