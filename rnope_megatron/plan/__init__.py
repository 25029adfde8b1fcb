"""``rnope-plan``: check and price a training recipe before any GPU is allocated.

:func:`make_plan` validates the layout with the trainer's rules and returns the layer map
per pipeline rank, memory per GPU by component (:mod:`.memory`), FLOPs per token by
component, step time at an assumed achieved TFLOP/s and the speed-up over the matching
all-global RoPE baseline; :func:`render` prints it. (``make_plan`` lives in
:mod:`.core`, ``render`` in :mod:`.report`: this file imports nothing, so the console
script's entry module quiets library notices before Megatron is first imported.)"""
