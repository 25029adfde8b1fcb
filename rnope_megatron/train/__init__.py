"""rnope-train: a training loop on Megatron-Core's engine.

``recipe`` (typed sections) and ``validation`` (one validator per section), ``engine``
(model chunks, DDP, optimizer, scheduler, the step), ``loop`` (set up, restore, train,
finish), ``metrics`` (console, metrics.jsonl, TensorBoard), ``run_lock`` (one trainer per
run directory). Checkpoints live in :mod:`rnope_megatron.checkpoint`, data in
:mod:`rnope_megatron.data`."""
