"""Evaluation of RNoPE-SWA models: retrieval far past the training length.

* :mod:`.tasks`: passkey and needle-in-a-haystack prompts (the recipe's tokenizer).
* :mod:`.scoring`: exact match of the greedy answer, per (length, depth).
* :mod:`.models`: a checkpoint (training's model and loader) or an HF export as logits.
* :mod:`.loss`: mean and per-position loss on token files or a data section.
* :mod:`.gate`: the same tasks on the training model every ``eval.interval`` iterations.
* :mod:`.cli`: the ``rnope-eval`` console script (its entry module: importing it quiets
  known library notices, so the trainer's gate imports :mod:`.gate`, never this).
"""
