"""Transformer Engine's fused attention for sliding-window layers under context
parallelism, with our halo exchange instead of TE's ``all_gather`` / ``a2a``.

TE's own CP for a window either gathers the whole sequence's K/V on every rank
(``all_gather``, O(L)) or splits heads (``a2a``); its ring (``p2p``) refuses windows. A
sliding layer needs only the W−1 keys before each chunk: this module exchanges exactly
those (:class:`rnope_megatron.attention.context_parallel.HaloExchange`) and calls TE's
attention on each local chunk against [halo ‖ chunk] with the window aligned to the end of
the keys (``causal_bottom_right``, which TE's fused backends support and which TE's own
``all_gather`` path uses internally). TE itself is built without CP for these layers.

It subclasses Megatron's ``TEDotProductAttention``, so its parameters and ``_extra_state``
keep the same checkpoint keys. Without Transformer Engine installed, Megatron's TE classes
are placeholders; then this class can sit in a spec (and be inspected) but refuses to be
built. Not run on this project's CPU machines: see the README's "what ran where".
"""

from __future__ import annotations

import copy

import torch
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from rnope_megatron.attention.context_parallel import context_parallel_group, with_halos
from rnope_megatron.common.errors import MissingDependency


def _te_available() -> bool:
    return isinstance(te_ext.TEDotProductAttention, type)


class _NeedsTransformerEngine(MegatronModule):
    """Stands in for a TE module class when TE is not installed: fine in a spec, refuses
    to be built."""

    def __init__(self, *args, **kwargs):
        raise MissingDependency(f"the te backend's {type(self).__name__} needs Transformer Engine: "
                                "pip install 'rnope-megatron[te]'")


class HaloTEDotProductAttention(te_ext.TEDotProductAttention if _te_available() else _NeedsTransformerEngine):
    """``TEDotProductAttention`` for a sliding-window layer whose CP is a halo exchange."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        local = copy.copy(config)  # TE attention per chunk, without TE's own CP
        local.context_parallel_size = 1
        super().__init__(local, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type=None, pg_collection=pg_collection, **kwargs)
        self.halo_group = context_parallel_group(pg_collection)
        self.window = config.window_size[0] + 1  # TE's inclusive (W-1, 0) back to HF's W

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        if packed_seq_params is not None:
            raise NotImplementedError("cp_comm_type: halo (te) does not take packed documents (THD); "
                                      "use a2a or all_gather for the sliding layers")
        if attention_bias is not None:
            raise NotImplementedError("halo attention: no attention bias")
        zz, extended = with_halos(key, value, self.window, self.halo_group)
        c, dim = zz.chunk, key.shape[-1]
        outputs = []
        for slot, keys in enumerate(extended):
            outputs.append(super().forward(query[slot * c:(slot + 1) * c], keys[..., :dim].contiguous(),
                                           keys[..., dim:].contiguous(), None, AttnMaskType.causal_bottom_right,
                                           num_splits=num_splits))
        return torch.cat(outputs)
