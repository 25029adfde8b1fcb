"""Calibration and evaluation data from the recipe's data, and the calibration forward
loop modelopt drives (with progress and ETA: calibrating a large model takes a while).

Samples are taken from the checkpoint's recipe data *after* the samples its run trained
on (``train.iters × train.global_batch_size``): calibration first, then evaluation. The
dataset repeats in epochs, so on a small corpus (the embedded one) they may still
overlap documents the model saw.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import torch

from rnope_megatron.data.dataset import SampleShape, build_dataset
from rnope_megatron.model.build import run_model
from rnope_megatron.recipe import recipe_from_dict


def available_memory() -> int | None:
    """Bytes this machine can still give (``MemAvailable``), or None where unknown."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Bytes per sample while the batches are built: its int64 tokens (the sample holds
# seq_length + 1 of them) twice (the dataset's sample, the stacked batch), plus Megatron's
# per-sample index entries (document, sample and shuffle indices).
INDEX_BYTES_PER_SAMPLE = 32


def check_memory(calib_samples: int, eval_samples: int, seq_length: int, recipe: dict,
                 available: int | None = None) -> None:
    """Refuse, before any work, calibration data that cannot fit in memory, naming the field."""
    available = available_memory() if available is None else available
    if available is None:
        return
    t = recipe.get("train") or {}
    trained = int(t.get("iters") or 0) * int(t.get("global_batch_size") or 0)  # indexed, then skipped
    per_sample = 2 * 8 * (seq_length + 1) + INDEX_BYTES_PER_SAMPLE
    need = (calib_samples + eval_samples) * per_sample + trained * INDEX_BYTES_PER_SAMPLE
    if need > available:
        field = "--calib-samples" if calib_samples >= eval_samples else "--eval-samples"
        value = max(calib_samples, eval_samples)
        raise ValueError(f"{field} {value}: {calib_samples + eval_samples:,} samples of {seq_length} tokens need "
                         f"~{need / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB available")


@dataclasses.dataclass
class Batches:
    """Token batches ([micro_batch, seq] each) for calibration and for the loss check."""

    calibration: list
    evaluation: list
    seq_length: int


def recipe_batches(recipe_dict: dict, calib_samples: int, eval_samples: int, seq_length: int | None,
                   cache_dir: pathlib.Path) -> Batches:
    """Batches from the saved recipe's data (see module docstring)."""
    recipe = recipe_from_dict(recipe_dict)
    t = recipe.train
    seq = seq_length or t.seq_length
    if seq > recipe.model.max_seq_length:
        raise ValueError(f"--calib-seq-length {seq} exceeds model.max_seq_length={recipe.model.max_seq_length}")
    start = t.iters * t.global_batch_size
    shape = dataclasses.replace(SampleShape.of(recipe), seq_length=seq)
    dataset = build_dataset(recipe.data, shape, cache_dir, start + calib_samples + eval_samples)
    micro = t.micro_batch_size

    def batches(first: int, count: int) -> list:
        out = []
        for begin in range(first, first + count, micro):
            rows = [dataset[i]["tokens"] for i in range(begin, min(begin + micro, first + count))]
            out.append(torch.stack(rows))
        return out

    return Batches(batches(start, calib_samples), batches(start + calib_samples, eval_samples), seq)


class Progress:
    """``label: i/n batches, elapsed, ETA`` lines, at most every ``every`` seconds (and at
    the first and last batch)."""

    def __init__(self, total: int, label: str, every: float = 5.0, out=None, clock=time.monotonic):
        self.total, self.label, self.every = total, label, every
        self.out = out or sys.stdout
        self.clock = clock
        self.start = clock()
        self.last = None

    def step(self, done: int) -> None:
        now = self.clock()
        if done not in (1, self.total) and self.last is not None and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done)
        print(f"{self.label}: {done}/{self.total} batches, {elapsed:.1f} s elapsed, ETA {eta:.1f} s",
              file=self.out, flush=True)


def calibration_loop(batches: list, every: float = 5.0):
    """The ``forward_loop`` for ``mtq.quantize``: runs every calibration batch. modelopt
    calls it once per calibration pass (AWQ runs two), so passes are numbered."""
    passes = [0]

    def loop(model) -> None:
        passes[0] += 1
        progress = Progress(len(batches), f"calibration pass {passes[0]}", every)
        with torch.no_grad():
            for index, tokens in enumerate(batches, 1):
                run_model(model, tokens)
                progress.step(index)

    return loop


@torch.no_grad()
def mean_loss(model, batches: list) -> float:
    """Mean next-token cross entropy over every evaluation token."""
    total, count = 0.0, 0
    for tokens in batches:
        per_token = run_model(model, tokens[:, :-1], tokens[:, 1:])
        total += per_token.double().sum().item()
        count += per_token.numel()
    return total / max(count, 1)
