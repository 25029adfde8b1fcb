"""Quantizers in rnope checkpoints: saved with the weights, restored before they load.

Megatron-LM's way (modelopt's ``mcore_dist_checkpointing`` plugin), in our one-directory
checkpoint layout:

* the model-wide modelopt state (the modes applied and their configs, without per-module
  entries) goes into the checkpoint's common state under :data:`MODELOPT_STATE`;
* each quantized linear's quantizer properties ride in its ``_extra_state`` and its
  calibrated tensors (``_amax``, ``_pre_quant_scale``) are sharded tensors beside its
  weight: module names change with PP/VPP, global checkpoint keys do not.

Loading is two-phase: restore the modes on a freshly built model (quantized modules
without calibrated buffers), load the ``_extra_state`` entries (which restore each
quantizer and size its buffers), then the normal load fills every tensor.

Layer keys stay stacked (``decoder.layers.<name>`` with the layer on axis 0) as in every
other rnope checkpoint: modelopt's Megatron hook switches
``config.hetereogenous_dist_checkpoint`` on (per-layer keys, for models whose layers are
quantized differently); our formats quantize every layer alike, and stacked keys let the
converter, ``rnope-eval`` and the weights-only paths read a quantized checkpoint like any
other. :func:`stacked_layer_keys` switches it back after every conversion.
"""

from __future__ import annotations

import copy
import pathlib
import sys

from rnope_megatron.checkpoint.layout import FAILURES, unreadable
from rnope_megatron.checkpoint.model_state import keep_what_the_checkpoint_holds
from rnope_megatron.common.errors import MissingDependency
from rnope_megatron.compat import cpu

EXTRA = "quant"
"""The package extra that installs NVIDIA Model Optimizer."""
INSTALL_HINT = f"pip install 'rnope-megatron[{EXTRA}]'"

MODELOPT_STATE = "modelopt_state"
"""Common-state key of the model-wide modelopt state."""
QUANTIZATION = "quantization"
"""Common-state key of rnope-quantize's record (format, calibration, losses)."""


def require_modelopt():
    """``modelopt.torch.quantization``, or a one-line :class:`MissingDependency` naming the
    extra to install."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise MissingDependency(f"quantization needs NVIDIA Model Optimizer (nvidia-modelopt, the '{EXTRA}' "
                                f"extra): {INSTALL_HINT} ({err})") from None

    cpu.scope_optional_modules()  # CPU runs: its Megatron plugin's CUDA calls, as Megatron's
    return mtq


def is_quantized(module) -> bool:
    """Whether modelopt converted ``module`` (False without importing modelopt when no
    code in this process has: then nothing can have been converted)."""
    if "modelopt.torch.opt" not in sys.modules:
        return False
    import modelopt.torch.opt as mto

    return mto.ModeloptStateManager.is_converted(module)


def stacked_layer_keys(model) -> None:
    """Undo modelopt's switch to per-layer checkpoint keys (see module docstring)."""
    from megatron.core.transformer.module import MegatronModule

    for module in model.modules():
        if isinstance(module, MegatronModule):
            module.config.hetereogenous_dist_checkpoint = False


def checkpoint_entries(chunks: list) -> dict:
    """Common-state entries that make a checkpoint of ``chunks`` (unwrapped model chunks)
    restore its quantizers; {} for an unquantized model."""
    if not is_quantized(chunks[0]):
        return {}
    import modelopt.torch.opt as mto
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import remove_per_module_state

    state = copy.deepcopy(mto.modelopt_state(chunks[0]))
    remove_per_module_state(state)  # per-module state rides in each module's _extra_state
    entries = {MODELOPT_STATE: state}
    record = getattr(chunks[0], "_rnope_quantization", None)
    if record is not None:  # rnope-quantize's record travels with QAT checkpoints
        entries[QUANTIZATION] = record
    return entries


def restore_quantizers(chunks: list, common: dict, path) -> bool:
    """Give freshly built ``chunks`` the quantizers of the checkpoint at ``path`` (whose
    common state is ``common``), ready for the normal load to fill their tensors. Returns
    whether the checkpoint was quantized. Parameters are not touched: optimizers and DDP
    buffers built before stay valid."""
    if MODELOPT_STATE not in common:
        return False

    require_modelopt()
    import modelopt.torch.opt as mto

    for chunk in chunks:
        if is_quantized(chunk):
            continue
        params = [id(p) for p in chunk.parameters()]
        restored = mto.restore_from_modelopt_state(chunk, copy.deepcopy(common[MODELOPT_STATE]))
        if restored is not chunk or [id(p) for p in chunk.parameters()] != params:
            raise RuntimeError("modelopt replaced the model or its parameters while restoring quantizers")
        stacked_layer_keys(chunk)
        _load_quantizer_properties(chunk, pathlib.Path(path))
        chunk._rnope_quantization = common.get(QUANTIZATION)
    return True


def _load_quantizer_properties(chunk, path: pathlib.Path) -> None:
    """Phase two: each quantized module's ``_extra_state`` (quantizer properties; buffers
    get their saved shapes, then the normal load fills them)."""
    from megatron.core import dist_checkpointing

    extra = {k: v for k, v in chunk.sharded_state_dict().items() if k.endswith("_extra_state")}
    (request,) = keep_what_the_checkpoint_holds([extra], path)
    try:
        loaded = dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    except FAILURES as err:
        raise unreadable(path, err) from None
    chunk.load_state_dict(loaded, strict=False)
    # torch calls set_extra_state only for classes that override it; modelopt registers
    # its callbacks per instance, so call it for every module that has them (idempotent).
    for name, module in chunk.named_modules():
        key = f"{name}._extra_state" if name else "_extra_state"
        if key in loaded and hasattr(module, "modelopt_set_extra_state_callbacks"):
            module.set_extra_state(loaded[key])


def quantized_weights_only(common: dict) -> bool:
    """A checkpoint rnope-quantize wrote: weights and quantizers, no optimizer (rnope-train
    continues it as QAT with a fresh optimizer)."""
    return QUANTIZATION in common and "optimizer" not in common
