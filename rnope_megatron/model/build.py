"""Model construction, in one place.

Megatron 0.19 deprecates ``GPTModel`` in favour of ``HybridModel``, whose layer symbols
cannot yet say "sliding" vs "global" and which counts attention and MLP as separate
layers. Everything that builds a model goes through :func:`build_model`, so moving to
HybridModel later is a change to this module only."""

from __future__ import annotations

import logging

import torch

from rnope_megatron.attention.self_attention import document_positions  # noqa: F401  (re-exported)
from rnope_megatron.attention.sliding_window import document_lengths
from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.model.norms import is_norm_bias
from rnope_megatron.model.specs import block_spec


def _scale_logits_hook(scale: float):
    # logits = W·(s·h) = s·(W·h): scaling the final norm's output scales the logits and
    # keeps GPTModel, its output layer and its state dict untouched.
    def hook(_module, _inputs, output):
        return output * scale

    return hook


def build_model(
    model: RNoPEConfig,
    config,
    backend: str = "portable",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
    bf16_attention_layers: frozenset[int] = frozenset(),
):
    """Build this rank's Megatron model chunk for ``model`` (see RNoPEConfig).

    Args:
        config: TransformerConfig from ``model.to_transformer_config(...)``.
        backend: ``portable`` or ``te`` (see :mod:`rnope_megatron.model.specs`).
        pre_process / post_process: whether this chunk holds the embedding / the output
            layer (first / last pipeline stage).
        vp_stage: virtual pipeline stage of this chunk (interleaved schedule).
        bf16_attention_layers: layers (global 1-based) that keep bf16 attention while the
            FP8 recipe runs FP8 attention elsewhere (``PrecisionPlan.bf16_attention_layers``).
    """
    from megatron.core.models.gpt import GPTModel

    # GPTModel logs a deprecation warning per construction; one notice in our docs suffices.
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    previous = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)
    try:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(model, config, backend, vp_stage=vp_stage,
                                              bf16_attention_layers=bf16_attention_layers),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model.tie_embeddings,
            # No model-global rotary: RoPE layers own theirs (rnope_megatron.attention).
            position_embedding_type="none",
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
    finally:
        gpt_logger.setLevel(previous)
    if post_process and model.logit_scale != 1.0:
        gpt.decoder.final_layernorm.register_forward_hook(_scale_logits_hook(model.logit_scale))
    if backend == "te" and model.normalization == "LayerNorm":
        freeze_norm_biases(gpt)
    return gpt


def run_model(model, tokens: torch.Tensor, labels: torch.Tensor | None = None, documents=None) -> torch.Tensor:
    """A GPTModel forward as training runs it: positions 0..L-1 and no attention mask (the
    causal mask and the window come from the specs). Logits, or the per-token loss when
    ``labels`` are given. The trainer, evaluation and quantization all call this one.

    ``documents`` (document masking): one ``cu_seqlens`` per row of ``tokens``
    ([0, e_1, ..., L], what Megatron's ``GPTDataset(inter_document_masking=True)`` returns
    with its padding stripped). The rows are then packed into one THD sequence, as
    Megatron-LM does, and passed as ``PackedSeqParams``: a token attends only to earlier
    tokens of its own document and RoPE positions restart at each document. The output has
    the same [B, L, ...] shape as without. Under context parallelism ``tokens`` are this
    rank's zig-zag chunks of ONE sequence (batch 1) and ``documents`` that whole
    sequence's boundaries. The loss is not masked here: the prediction
    crossing a boundary (a document's last token predicting the next one's first) is the
    caller's to drop (:func:`crossing_predictions`)."""
    if documents is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None, labels=labels)
    from megatron.core.utils import get_attr_wrapped_model

    batch, seq = tokens.shape
    cp = model.config.context_parallel_size
    if cp > 1 and batch != 1:
        raise ValueError(f"documents: under context parallelism one packed sequence per micro-batch "
                         f"(batch 1), got batch {batch}")
    # under CP, tokens are this rank's zig-zag chunks and the boundaries the whole sequence's
    packed = pack_documents(documents, batch, seq * cp, tokens.device)
    positions = torch.arange(batch * seq, device=tokens.device)[None]  # unused: RoPE is per layer
    flat_labels = None if labels is None else labels.reshape(1, batch * seq)
    out = model(tokens.reshape(1, batch * seq), positions, None, labels=flat_labels,
                packed_seq_params=packed)
    if not get_attr_wrapped_model(model, "post_process"):
        return out  # a pipeline stage's hidden states [batch * seq, 1, h]: the next stage's input
    return out.reshape(batch, seq, *out.shape[2:])


def pack_documents(documents, batch: int, seq: int, device=None):
    """Megatron THD ``PackedSeqParams`` for ``batch`` rows of ``seq`` tokens, each row cut at
    its own ``cu_seqlens`` (a list of ``batch`` boundary lists/tensors): the rows become one
    pack whose boundaries are the rows' offset by ``row·seq``. A row whose boundaries do
    not tile [0, seq] is refused in one line naming it."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if len(documents) != batch:
        raise ValueError(f"documents: one cu_seqlens per row expected ({batch}), got {len(documents)}")
    bounds = [0]
    for row, cu in enumerate(documents):
        try:
            lengths = document_lengths(cu, seq)
        except ValueError as err:
            raise ValueError(f"documents[{row}]: {err}") from None
        for length in lengths:
            bounds.append(bounds[-1] + length)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def crossing_predictions(cu_seqlens, total: int) -> torch.Tensor:
    """Boolean [total]: True at each document's last token except the sequence's last,
    whose label is the next document's first token (a prediction across documents, which
    document-masked training does not count)."""
    crossing = torch.zeros(total, dtype=torch.bool)
    ends = torch.as_tensor(cu_seqlens).long()[1:-1] - 1
    crossing[ends] = True
    return crossing


def freeze_norm_biases(model) -> list[str]:
    """Zero and freeze every LayerNorm bias (TE's LayerNorm always has one; the model, like
    Cohere2 and the portable norm, has none): te and portable then compute the same
    function, nothing is trained that an export would drop, and checkpoints move between
    the backends. Returns the names frozen."""
    import torch

    frozen = []
    for name, param in model.named_parameters():
        if is_norm_bias(name):
            with torch.no_grad():
                param.zero_()
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_single_rank_model(model: RNoPEConfig, meta: bool = False):
    """The whole model on one rank (TP=PP=1, portable backend), e.g. for conversion and
    evaluation. ``meta``: on the meta device, without allocating weights (its
    ``sharded_state_dict`` still names every tensor's checkpoint key and shape)."""
    config = model.to_transformer_config(init_model_with_meta_device=meta, perform_initialization=not meta)
    return build_model(model, config)
