"""Document masking vs none: whole-model forward + backward on one packed sequence.

One sequence of ``--seq-len`` tokens (default 32k) cut into documents of ``--doc-len``
tokens (default 2k) runs through the same model twice per repeat, alternated in one
process so both see the same machine load: once with document masking (``run_model(...,
documents=...)``: each token attends only to its own document) and once without. The
table puts the measured speed-up next to the FLOP model's (:func:`rnope_megatron.model.flops.pack_forward_flops`:
linear FLOPs per token, attention sum(d_i^2) over documents vs L^2 on global layers and
sum(d_i·W) vs L·W on sliding ones) and their ratio (the goal is >= 0.8). A small width
keeps the run to minutes on CPU; attention then dominates, as it does at long context.

    python benchmarks/document_mask.py                  # table
    python benchmarks/document_mask.py --json           # one JSON object
    python benchmarks/document_mask.py --png out.png    # also a bar plot
"""

from __future__ import annotations

import argparse
import json
import time

import torch

ROW_KEYS = ("seq_len", "doc_len", "window", "pattern", "plain_ms", "masked_ms", "measured_speedup",
            "flop_speedup", "fraction_of_flop_speedup", "kernel")


def model_config(args):
    from rnope_megatron.model.config import RNoPEConfig

    return RNoPEConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                       num_query_groups=args.kv_heads, ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab,
                       max_seq_length=args.seq_len, pattern=args.pattern, window=args.window)


def measure(args) -> dict:
    from rnope_megatron.attention.native_cpu import kernel_in_use
    from rnope_megatron.common.cli import quiet_known_warnings
    from rnope_megatron.common.distributed import ensure_single_process
    from rnope_megatron.model.build import build_single_rank_model, run_model
    from rnope_megatron.model.flops import pack_forward_flops

    quiet_known_warnings()
    ensure_single_process()
    torch.manual_seed(0)
    cfg = model_config(args)
    model = build_single_rank_model(cfg).train()
    seq = args.seq_len
    lengths = [args.doc_len] * (seq // args.doc_len) + ([seq % args.doc_len] if seq % args.doc_len else [])
    documents = [[0, *torch.tensor(lengths).cumsum(0).tolist()]]
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1))
    tokens, labels = ids[:, :-1], ids[:, 1:]

    def step(docs):
        model.zero_grad(set_to_none=True)
        run_model(model, tokens, labels, documents=docs).float().mean().backward()

    runs = {"plain": None, "masked": documents}
    for docs in runs.values():
        step(docs)  # warm-up: kernel build, allocator
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, docs in runs.items():
            started = time.perf_counter()
            step(docs)
            best[name] = min(best[name], time.perf_counter() - started)
    measured = best["plain"] / best["masked"]
    predicted = pack_forward_flops(cfg, [seq]) / pack_forward_flops(cfg, lengths)
    return dict(seq_len=seq, doc_len=args.doc_len, window=args.window, pattern=args.pattern,
                plain_ms=1000 * best["plain"], masked_ms=1000 * best["masked"],
                measured_speedup=measured, flop_speedup=predicted,
                fraction_of_flop_speedup=measured / predicted, kernel=kernel_in_use())


def table(row: dict) -> str:
    lines = [
        f"document masking, whole model fwd+bwd: L={row['seq_len']}, documents of {row['doc_len']}, "
        f"W={row['window']}, pattern {row['pattern']}, CPU kernel {row['kernel']}, {row['threads']} thread(s)",
        f"{'no mask ms':>11} {'masked ms':>10} {'measured':>9} {'FLOP model':>11} {'fraction':>9}",
        f"{row['plain_ms']:11.0f} {row['masked_ms']:10.0f} {row['measured_speedup']:8.2f}x "
        f"{row['flop_speedup']:10.2f}x {row['fraction_of_flop_speedup']:9.2f}",
    ]
    return "\n".join(lines)


def plot(row: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["measured", "FLOP model"], [row["measured_speedup"], row["flop_speedup"]], color=["C0", "C7"])
    ax.set_ylabel("speed-up of document masking")
    ax.set_title(f"L={row['seq_len']}, documents of {row['doc_len']}, W={row['window']}")
    for x, value in enumerate([row["measured_speedup"], row["flop_speedup"]]):
        ax.text(x, value, f"{value:.2f}x", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--doc-len", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--pattern", default="SSSG")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default). On a machine shared with other jobs, 1 "
                             "keeps the per-operation thread hand-offs, which the masked run has more of, "
                             "from being timed as work")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--png", help="also write a bar plot here")
    args = parser.parse_args(argv)
    if args.doc_len < 1 or args.seq_len < 1:
        parser.error("--seq-len and --doc-len must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    row = measure(args)
    row["threads"] = torch.get_num_threads()
    print(json.dumps(row) if args.json else table(row))
    if args.png:
        plot(row, args.png)


if __name__ == "__main__":
    main()
