"""Training on Megatron-Core's engine: recipes, data, engine, checkpoints, metrics."""
