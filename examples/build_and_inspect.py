"""Build an RNoPE-SWA model with Megatron-Core and print what each layer is.

    python examples/build_and_inspect.py                    # one CPU process
    torchrun --nproc-per-node 2 examples/build_and_inspect.py --tensor 2

Builds the portable model (runs here) and the TE spec tree (inspected only, unless
Transformer Engine is installed), then runs one forward pass.
"""

import argparse

import torch

from rnope_megatron import ParallelLayout, RNoPEConfig, build_model
from rnope_megatron.common.distributed import initialize_parallel
from rnope_megatron.model.specs import layer_spec


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pattern", default="SSSG")
    args = parser.parse_args()

    cfg = RNoPEConfig(num_layers=8, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=256, max_seq_length=128, window=32, pattern=args.pattern)
    layout = ParallelLayout(tensor=args.tensor)
    initialize_parallel(layout)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    model = build_model(cfg, cfg.to_transformer_config(layout))
    if rank0:
        print(cfg.layer_pattern.describe())
        for layer in model.decoder.layers:
            attn = layer.self_attention
            print(f"built layer {layer.layer_number}: {attn.core_attention.extra_repr()}, "
                  f"{'RoPE ' + attn.rotary.extra_repr() if attn.rotary else 'NoPE'}")
        te = layer_spec(cfg, cfg.layer_pattern.kind(1), backend="te")
        core = te.submodules.self_attention.submodules.core_attention
        # Without Transformer Engine, Megatron defines its TE classes as placeholders.
        real = isinstance(core, type) and core.__module__.startswith("megatron")
        print("te spec, layer 1 core attention:", "TEDotProductAttention" +
              ("" if real else " (placeholder: Transformer Engine is not installed)"))
    ids = torch.randint(0, cfg.vocab_size, (2, 96))
    logits = model(ids, torch.arange(96).expand(2, -1), None)
    if rank0:
        print("logits (this TP rank's vocab shard):", tuple(logits.shape))


if __name__ == "__main__":
    main()
