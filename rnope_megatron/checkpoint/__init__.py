"""Checkpoints, in one place: the directory format, saving and loading the training state,
reading weights layer by layer, and writing weights-only checkpoints.

Used by ``train`` (save/resume), ``convert`` (to-hf reads, from-hf writes) and ``eval``
(loads a model): none of them needs another's code to reach a checkpoint.

* :mod:`.layout`: ``iter_N`` directories, the ``latest`` marker, the completeness manifest,
  resolving a path, the atomic ``save_state`` every writer goes through.
* :mod:`.training_state`: model + optimizer + scheduler + RNG of a training engine.
* :mod:`.reader`: named TP=1 tensors from any checkpoint, a layer at a time.
* :mod:`.weights_only`: a TP=1 model's weights as a checkpoint ``rnope-train`` can load.
"""
