"""Evaluation gates: retrieval accuracy of the *training* model every ``eval.interval``
iterations (the recipe's ``eval:`` section), logged to metrics.jsonl and TensorBoard.

A gate must not change the training trajectory, so it reads nothing training reads and
writes nothing training uses:

* prompts come from :mod:`.tasks` (their own seeded :class:`random.Random`), not from the
  dataset, so the data order (a pure function of the iteration) is untouched;
* the forward runs under ``torch.no_grad`` in eval mode and inside ``torch.random.fork_rng``
  (torch's CPU and CUDA generators are restored afterwards, even if something drew from
  them), so no gradient, optimizer state or random state moves;
* the gate is a pure function of (weights, eval section), so a resumed run logs the same
  accuracies a run that was never killed logs.

Every rank runs the same prompts (tensor-parallel ranks must: the forward is collective);
vocab-sharded logits are gathered before the argmax. Pipeline and context parallelism
are refused by validation (the forward there is a scheduled, split one).
"""

from __future__ import annotations

import torch

from rnope_megatron.common import faults
from rnope_megatron.common.typed import ConfigError
from rnope_megatron.data.tokenizers import make_tokenizer
from rnope_megatron.eval.memory import available_bytes, refuse_if_too_large
from rnope_megatron.eval.scoring import by_length, default_batch_size, evaluate_grid
from rnope_megatron.eval.tasks import build_grid, minimum_length
from rnope_megatron.model.build import run_model


def refuse_gate_too_large(recipe, platform=None) -> None:
    """Refuse (ValueError naming ``eval.lengths``) a gate whose evaluation cannot fit in the
    device's memory, at recipe validation: before any process group, and long before the
    first gate (which would fail after hours of training). ``platform`` (a GPU's, from
    ``--gpu`` or this machine) bounds it by the whole device's memory, else the host's
    available memory does; training needs memory too, so passing is necessary, not enough."""
    e, m = recipe.eval, recipe.model
    if not e.interval:
        return
    lengths = list(e.lengths or [recipe.train.seq_length])
    available = int(platform.gpu.memory_gb * 1e9) if platform is not None else available_bytes("cpu")
    try:
        refuse_if_too_large("eval.lengths", lengths, len(e.tasks) * len(e.depths) * e.samples, default_batch_size,
                            m.hidden_size, m.ffn_hidden_size, m.vocab_size, available)
    except ValueError as err:
        raise ConfigError(str(err)) from None  # a recipe problem: "bad recipe: eval.lengths: ..."


class GateInterrupted(Exception):
    """A stop was requested during a gate: the gate gives way to the checkpoint save."""


class EvalGate:
    """Retrieval tasks on model chunk 0 of the engine (PP=1: the whole model)."""

    def __init__(self, recipe, model_chunks: list, device):
        e = recipe.eval
        self.interval = e.interval
        self.model = model_chunks[0]
        self.device = device
        tokenizer = make_tokenizer(recipe.data.tokenizer)
        self.lengths = list(e.lengths or [recipe.train.seq_length])
        self.grids = {}
        for task in e.tasks:
            shortest = minimum_length(task, tokenizer)
            too_short = [n for n in self.lengths if n < shortest]
            if too_short:
                raise ValueError(f"eval.lengths: {too_short} too short for a {task} prompt with "
                                 f"data.tokenizer={recipe.data.tokenizer} (at least {shortest} tokens)")
            # built once: identical prompts at every gate, on every rank, in every run
            self.grids[task] = build_grid(task, self.lengths, e.depths, e.samples, e.seed, tokenizer)

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        ids = ids.to(self.device)

        logits = run_model(self.model, ids)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)  # vocab-sharded -> whole
        return logits.float()

    def run(self, iteration: int = 0, should_stop=None) -> dict | None:
        """``{task: {length: accuracy}}`` (mean over depths and samples), keys as strings;
        None when ``should_stop()`` (asked after every forward, on every rank: it must be
        collective, as :meth:`StopRequest.any_rank` is) turned true before the end. A
        pre-emption's grace period is then spent on the save, not on the rest of the
        gate; the gate is a pure function of the weights, so ``rnope-eval`` on the saved
        checkpoint gives what it would have logged."""
        def after_batch():
            faults.point("in_gate", iteration)
            if should_stop is not None and should_stop():
                raise GateInterrupted

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                results = {}
                for task, grid in self.grids.items():
                    rows = []
                    for length in self.lengths:
                        cells = {k: v for k, v in grid.items() if k[0] == length}
                        rows += evaluate_grid(self._logits, cells, default_batch_size(length), after_batch=after_batch)
                    results[task] = {str(n): acc for n, acc in by_length(rows).items()}
        except GateInterrupted:
            return None
        finally:
            self.model.train(was_training)
        return results
