"""The model layer: what an RNoPE-SWA network is and how Megatron builds it.

* :mod:`.pattern`: the layer pattern (``SSSG``...), the one place layer kinds are decided.
* :mod:`.config`: the model config (:class:`RNoPEConfig`) -> Megatron's TransformerConfig;
  the parallel layout (:class:`ParallelLayout`).
* :mod:`.specs`: Megatron ``ModuleSpec`` trees per layer kind and backend.
* :mod:`.build`: model construction (the only caller of ``GPTModel``) and its one forward.
* :mod:`.parallel_block`, :mod:`.norms`: Cohere's parallel block, device-agnostic norms.
* :mod:`.layout_invariant_init`: the same weights for any TP/PP/VPP layout.
* :mod:`.fusions`, :mod:`.precision`: CUDA fusions a machine can use; the FP8 per-layer policy.
* :mod:`.flops`: the FLOP model (exact window term).
"""
