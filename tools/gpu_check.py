"""GPU checks for a machine with CUDA (not run in CI): the portable backend's CUDA path.

1. FlexAttention sliding window vs a dense float64 reference, forward and gradients.
2. The whole model on CUDA vs the same weights on CPU (logits).
3. benchmarks/attention.py on CUDA (bf16), printed as a table.

    python tools/gpu_check.py [--quick]
"""

import argparse
import math
import subprocess
import sys

import torch


def check_flex(results):
    from rnope_megatron.attention.sliding_window import sliding_window_attention, sliding_window_mask

    for seq, window, heads, groups in [(1000, 128, 8, 2), (4096, 512, 8, 8), (333, 64, 4, 1)]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, seq, 64, generator=g) for h in (heads, groups, groups))
        qc, kc, vc = (x.cuda().requires_grad_() for x in (q, k, v))
        out = sliding_window_attention(qc, kc, vc, window)
        out.sum().backward()
        qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
        rep = heads // groups
        s = qd @ kd.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(64)
        ref = torch.softmax(s.masked_fill(~sliding_window_mask(seq, window), float("-inf")), -1)
        ref = ref @ vd.repeat_interleave(rep, 1)
        ref.sum().backward()
        err = max((out.double().cpu() - ref).abs().max().item(),
                  *((a.grad.double().cpu() - b.grad).abs().max().item() for a, b in ((qc, qd), (kc, kd), (vc, vd))))
        results.append((f"flex SWA L={seq} W={window} H={heads}/{groups}", err, err < 2e-3))


def check_model(results):
    from rnope_megatron import ParallelLayout, RNoPEConfig, build_model
    from rnope_megatron.distributed import initialize_parallel
    from rnope_megatron.weights import fill_from_global, seeded_full_tensor

    initialize_parallel(ParallelLayout())
    cfg = RNoPEConfig(num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                      vocab_size=512, max_seq_length=1024, window=128)
    tc = cfg.to_transformer_config()
    model = build_model(cfg, tc)
    fill_from_global(model, seeded_full_tensor(7))
    ids = torch.randint(0, 512, (2, 1024))
    pos = torch.arange(1024).expand(2, -1)
    with torch.no_grad():
        gpu = model.cuda()(ids.cuda(), pos.cuda(), None).cpu()
        cpu = model.cpu()(ids, pos, None)
    err = (gpu - cpu).abs().max().item()
    results.append(("model logits CUDA vs CPU (fp32)", err, err < 1e-2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script is for a GPU machine")
    results = []
    check_flex(results)
    check_model(results)
    print(f"{'check':<45}{'max abs err':>14}  ok")
    for name, err, ok in results:
        print(f"{name:<45}{err:>14.2e}  {'yes' if ok else 'NO'}")
    lens = ["4096", "16384"] if args.quick else ["4096", "16384", "65536", "131072"]
    subprocess.run([sys.executable, "benchmarks/attention.py", "--device", "cuda", "--dtype", "bfloat16",
                    "--window", "4096", "--ratio", "32", "--heads", "32", "--head-dim", "128",
                    "--seq-lens", *lens], check=True)
    sys.exit(0 if all(ok for *_, ok in results) else 1)


if __name__ == "__main__":
    main()
