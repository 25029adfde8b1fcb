"""Quantization with NVIDIA Model Optimizer (``nvidia-modelopt``, the ``quant`` extra).

* :mod:`.formats`: the formats ``rnope-quantize`` offers and the modelopt configs behind
  them; modelopt is imported through :func:`rnope_megatron.checkpoint.quantizer_state.require_modelopt`.
* :mod:`.calibration`: calibration and evaluation batches from the recipe's data, the
  calibration forward loop with progress and ETA.
* :mod:`.state`: quantizers in rnope-train checkpoints (saved with the weights, restored
  before the weights load), so ``rnope-train checkpoint.load=DIR`` continues as QAT.
* :mod:`.hf_export`: a quantized Hugging Face directory (modelopt's unified format) through
  our converter's tables.
* :mod:`.command`: what ``rnope-quantize`` runs.

Nothing here is imported by the rest of the package unless a checkpoint holds quantizers
or a command asks for quantization: the package imports, and trains, without modelopt.
"""
