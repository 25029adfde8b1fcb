"""The parallel (Cohere-style) transformer layer.

``x + attn(LN(x)) + mlp(LN(x))`` with ONE input norm shared by both branches. Built from
the same submodule slots as Megatron's ``TransformerLayer`` (its spec simply leaves
``pre_mlp_layernorm`` as IdentityOp), so checkpoints, TP/SP and pipeline stages treat it
like any other Megatron layer."""

from __future__ import annotations

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class ParallelAttentionMLPLayer(TransformerLayer):
    """Megatron layer computing attention and MLP side by side on one normed input."""

    def __init__(self, config, submodules, *args, **kwargs):
        if submodules.pre_mlp_layernorm is not IdentityOp:
            raise ValueError(
                "the parallel block shares the input norm; pre_mlp_layernorm must be IdentityOp "
                "(a second norm would be trained independently and diverge from the first)"
            )
        super().__init__(config, submodules, *args, **kwargs)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, **_unused):
        normed = self.input_layernorm(hidden_states)
        attention_out = self.self_attention(
            normed,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_out = self.mlp(normed)
        with self.bias_dropout_add_exec_handler():
            # residual + attn, then (residual + attn) + mlp: dropout applies per branch.
            hidden = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_out, hidden_states, self.hidden_dropout
            )
            hidden = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp_out, hidden, self.hidden_dropout
            )
        output = make_viewless_tensor(inp=hidden, requires_grad=hidden.requires_grad, keep_graph=True)
        return output, context
