"""Document masking on the ``te`` backend: what Transformer Engine can run with THD.

Megatron passes THD ``PackedSeqParams`` (``cu_seqlens_q/kv``, ``max_seqlen_q/kv``) from
``GPTModel`` through ``SelfAttention`` (which squeezes the dummy batch to [t, h, d] and
applies RoPE per document with ``cu_seqlens``) to ``TEDotProductAttention``; our
``RNoPESelfAttention`` hands them on unchanged. TE then runs varlen attention. It cannot
run every combination with a sliding window, and fails deep inside its backend selection
when asked to, so :func:`te_thd_refusal` says first, in one line naming the field:

* FP8 attention (``fp8_dot_product_attention``): TE's FP8 fused attention takes bshd/sbhd
  only, never THD (a layer our FP8 plan keeps in bf16 attention is fine);
* a sliding-window layer without context parallelism needs cuDNN >= 9.6 or flash-attn
  >= 2.3 (TE 2.18's varlen backends with a window);
* a sliding layer under context parallelism: ``cp_comm_type`` must be ``a2a`` (THD from
  TE 2.11; heads and query groups per TP rank divisible by CP) or ``all_gather`` (THD
  from TE 2.18). ``p2p`` and ``a2a+p2p`` refuse windows; our ``halo`` exchange on te does
  not take packed sequences (the portable backend's does not either, yet).

Versions that cannot be read (no GPU, checking a recipe offline) are assumed recent
enough and checked again where the run starts. The trainer's recipe check refuses te with
context parallelism and documents altogether (its sequence-level zig-zag split is not the
per-document split TE's THD attention expects); these rules serve te without CP and a
model run directly with ``run_model``.
"""

from __future__ import annotations

from typing import Optional

from rnope_megatron.attention.te_precision import _BF16Attention
from rnope_megatron.common.errors import UserError
from rnope_megatron.common.gpus import cudnn_version, te_version

Version = Optional[tuple[int, int]]


def te_thd_refusal(
    *, sliding: bool, fp8_attention: bool, cp_size: int = 1, cp_comm_type: Optional[str] = None,
    te_version: Version = None, cudnn_version: Version = None, flash_attn_version: Version = None,
    heads_per_rank: int = 1, groups_per_rank: int = 1,
) -> Optional[str]:
    """Why TE cannot run THD (document-masked) attention on one layer, or None if it can."""
    if fp8_attention:
        return ("fp8_dot_product_attention: TE's FP8 attention takes bshd/sbhd only, never THD "
                "(packed documents); keep attention in bf16 (train.fp8.attention: off) or turn "
                "document masking off")
    if not sliding:
        return None
    if cp_size <= 1:
        cudnn_ok = cudnn_version is None or cudnn_version >= (9, 6)
        flash_ok = flash_attn_version is not None and flash_attn_version >= (2, 3)
        if not (cudnn_ok or flash_ok):
            return (f"window_size: TE runs sliding-window attention on packed documents (THD) only "
                    f"with cuDNN >= 9.6 or flash-attn >= 2.3; found cuDNN {_v(cudnn_version)}, "
                    f"flash-attn {_v(flash_attn_version)}")
        return None
    if cp_comm_type == "all_gather":
        if te_version is not None and te_version < (2, 18):
            return (f"cp_comm_type: all_gather with a sliding window runs THD only from Transformer "
                    f"Engine 2.18; found {_v(te_version)}")
        return None
    if cp_comm_type == "a2a":
        if te_version is not None and te_version < (2, 11):
            return f"cp_comm_type: a2a runs THD only from Transformer Engine 2.11; found {_v(te_version)}"
        if heads_per_rank % cp_size or groups_per_rank % cp_size:
            return (f"cp_comm_type: a2a needs attention heads ({heads_per_rank}) and query groups "
                    f"({groups_per_rank}) per tensor-parallel rank divisible by context parallelism "
                    f"({cp_size})")
        return None
    return (f"cp_comm_type: {cp_comm_type} cannot run a sliding window on packed documents (THD) "
            "with Transformer Engine; use a2a or all_gather for the sliding layers "
            "(parallel.context_comm_sliding), or the portable backend")


def _v(version: Version) -> str:
    return "unknown" if version is None else "%d.%d" % version


def flash_attn_version() -> Version:
    """The installed flash-attn's (major, minor), or None."""
    from importlib import metadata

    try:
        major, minor = metadata.version("flash-attn").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def layer_cp_comm_type(config, layer_number: int) -> Optional[str]:
    """The layer's ``cp_comm_type`` (Megatron's field is one string or one per layer)."""
    comm = config.cp_comm_type
    if isinstance(comm, (list, tuple)):
        return comm[layer_number - 1]
    return comm


def check_te_packed_attention(config, layer_number: int, core_attention) -> None:
    """Raise (one line naming the field) if this te layer cannot run THD documents here.
    Called by ``RNoPESelfAttention`` on the first packed forward of a layer."""
    from megatron.core.transformer.utils import is_layer_window_attention

    sliding = config.window_size is not None and is_layer_window_attention(
        config.window_size, config.window_attn_skip_freq, layer_number)
    fp8_attention = bool(config.fp8 and config.fp8_dot_product_attention) and not isinstance(
        core_attention, _BF16Attention)
    tp = config.tensor_model_parallel_size
    reason = te_thd_refusal(
        sliding=sliding, fp8_attention=fp8_attention, cp_size=config.context_parallel_size,
        cp_comm_type=layer_cp_comm_type(config, layer_number), te_version=te_version(),
        cudnn_version=cudnn_version(), flash_attn_version=flash_attn_version(),
        heads_per_rank=config.num_attention_heads // tp,
        groups_per_rank=(config.num_query_groups or config.num_attention_heads) // tp,
    )
    if reason:
        raise UserError(f"document masking on the te backend, layer {layer_number}: {reason}")
