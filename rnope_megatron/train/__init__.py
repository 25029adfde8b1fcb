"""rnope-train: a training loop on Megatron-Core's engine.

``engine`` (model chunks, DDP, optimizer, scheduler, the step), ``loop`` (set up, restore,
train, finish), ``metrics`` (console, metrics.jsonl, TensorBoard), ``console`` (the
start-of-run text), ``run_lock`` (one trainer per run directory). Recipes are read through
:mod:`rnope_megatron.recipe`, checkpoints live in :mod:`rnope_megatron.checkpoint`, data in
:mod:`rnope_megatron.data`."""
