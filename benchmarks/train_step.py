"""Training step time and peak memory vs sequence length: RNoPE-SWA vs the all-global
RoPE baseline (same model, pattern ``R``), both on the portable backend, next to the FLOP
model's predicted speed-up (rnope_megatron.model.flops); and the RNoPE-SWA step vs Hugging Face
transformers' SmolLM3 class with the same shape and layer types (sdpa attention, its best
on CPU: the sliding window there is a dense mask).

A step is forward + backward of the next-token loss on one sequence plus an AdamW update.
Times: one subprocess per row builds both models and alternates their steps after a
warm-up step each (best of ``--repeats`` pairs), so the ratio is taken under one machine
load. Memory: each model's first step in a fresh subprocess (RNoPE-SWA's in the timing
one, before the other model is built), so its peak-RSS growth is its own (on CUDA,
max_memory_allocated). Absolute times on a shared machine are noise.

    python benchmarks/train_step.py                          # table, L/W = 16 and 32
    python benchmarks/train_step.py --hf-lengths 8192 16384  # + HF SmolLM3 comparison
    python benchmarks/train_step.py --json --png out.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROW_KEYS = ("kind", "seq_len", "window", "ratio", "rnope_ms", "other_ms", "measured_speedup", "flop_speedup",
            "fraction_of_flop_speedup", "rnope_peak_mb", "other_peak_mb")


def shape(args, pattern: str, seq_len: int, window: int) -> dict:
    return dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                num_query_groups=args.kv_heads, ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab,
                max_seq_length=max(seq_len, window + 1), pattern=pattern, window=window)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(spec: dict):
    """(model, step_inputs -> loss) for ``spec["impl"]`` in {megatron, hf}."""
    import torch

    from rnope_megatron.common.cli import quiet_known_warnings
    from rnope_megatron.model.config import RNoPEConfig

    quiet_known_warnings()
    cfg = RNoPEConfig(**spec["model"])
    if spec["impl"] == "megatron":
        from rnope_megatron.common.distributed import ensure_single_process
        from rnope_megatron.model.build import build_single_rank_model

        ensure_single_process()
        model = build_single_rank_model(cfg)

        def loss(ids):
            tokens, labels = ids[:, :-1], ids[:, 1:]
            positions = torch.arange(tokens.shape[1], device=ids.device).expand_as(tokens)
            return model(tokens, positions, None, labels=labels).float().mean()
    else:
        from transformers import SmolLM3Config, SmolLM3ForCausalLM

        from rnope_megatron.convert.targets import adapter_named

        hf = adapter_named("smollm3").to_hf(cfg)
        hf.pop("architectures", None)
        hf.pop("model_type", None)
        model = SmolLM3ForCausalLM(SmolLM3Config(**hf, attn_implementation="sdpa"))

        def loss(ids):
            return model(input_ids=ids, labels=ids).loss
    return model, loss


def _stepper(spec: dict):
    """(model's step function, its device) for one model spec."""
    import torch

    torch.manual_seed(0)
    model, loss = _build(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, spec["model"]["vocab_size"], (1, spec["seq_len"] + 1), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss(ids).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, device


def _worker(spec: dict) -> dict:
    """``mode="memory"``: peak memory growth of one model's first step. ``mode="time"``:
    that peak for the first of ``spec["pair"]`` (two model specs), then the best step
    times of both, alternated after a warm-up."""
    import torch

    def first_step_peak_mb(step, device) -> float:
        base = _rss_mb()  # after building: the growth is the step's (activations, grads, Adam state)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base

    if spec["mode"] == "memory":
        return {"peak_mb": first_step_peak_mb(*_stepper(spec))}
    # The first model's first step is its warm-up and, the first in this fresh process,
    # its memory measurement; the second model is built only after it (one process fewer).
    first, device = _stepper({**spec["pair"][0], "seq_len": spec["seq_len"]})
    peak_mb = first_step_peak_mb(first, device)
    second = _stepper({**spec["pair"][1], "seq_len": spec["seq_len"]})[0]
    second()  # warm-up (kernel build, allocator)
    steps = [first, second]
    best = [float("inf")] * len(steps)
    for _ in range(spec["repeats"]):
        for index, step in enumerate(steps):
            started = time.perf_counter()
            step()
            best[index] = min(best[index], time.perf_counter() - started)
    return {"ms": [1000 * b for b in best], "peak_mb": peak_mb}


def _run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train_step.py: worker {spec['mode']} L={spec['seq_len']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(ours: dict, other: dict, seq_len: int, repeats: int) -> tuple[dict, dict]:
    """Step times (alternated in one process) and peak memory (one process each)."""
    timed = _run_worker({"mode": "time", "seq_len": seq_len, "repeats": repeats, "pair": [ours, other]})
    other_peak_mb = _run_worker({**other, "mode": "memory", "seq_len": seq_len})["peak_mb"]
    return ({"ms": timed["ms"][0], "peak_mb": timed["peak_mb"]}, {"ms": timed["ms"][1], "peak_mb": other_peak_mb})


def flop_speedup(args, seq_len: int, window: int) -> float:
    from rnope_megatron.model.config import RNoPEConfig
    from rnope_megatron.model.flops import training_flops_per_token

    base = training_flops_per_token(RNoPEConfig(**shape(args, "R", seq_len, window)), seq_len)
    ours = training_flops_per_token(RNoPEConfig(**shape(args, "SSSG", seq_len, window)), seq_len)
    return base / ours


def rows(args) -> list[dict]:
    out = []
    for ratio in args.ratios:
        for seq in args.seq_lens:
            window = seq // ratio
            ours, other = measure({"impl": "megatron", "model": shape(args, "SSSG", seq, window)},
                                  {"impl": "megatron", "model": shape(args, "R", seq, window)}, seq, args.repeats)
            out.append(_row("vs RoPE baseline", seq, window, ratio, ours, other, flop_speedup(args, seq, window)))
            _progress(args, out[-1])
    for seq in args.hf_lengths:
        window = seq // args.ratios[0]
        model = shape(args, "SSSG", seq, window)
        ours, other = measure({"impl": "megatron", "model": model}, {"impl": "hf", "model": model}, seq, args.repeats)
        out.append(_row("vs HF SmolLM3", seq, window, args.ratios[0], ours, other, None))
        _progress(args, out[-1])
    return out


def _row(kind, seq, window, ratio, ours, other, predicted) -> dict:
    speedup = other["ms"] / ours["ms"]
    return {"kind": kind, "seq_len": seq, "window": window, "ratio": ratio, "rnope_ms": round(ours["ms"], 1),
            "other_ms": round(other["ms"], 1), "measured_speedup": round(speedup, 3),
            "flop_speedup": round(predicted, 3) if predicted else None,
            "fraction_of_flop_speedup": round(speedup / predicted, 3) if predicted else None,
            "rnope_peak_mb": round(ours["peak_mb"], 1), "other_peak_mb": round(other["peak_mb"], 1)}


def _progress(args, row) -> None:
    if not args.json:
        print(f"  {row['kind']}: L={row['seq_len']} W={row['window']} done", file=sys.stderr, flush=True)


def table(data: list[dict]) -> str:
    lines = [f"{'comparison':<18}{'L':>7}{'W':>6}{'L/W':>5}{'RNoPE ms':>10}{'other ms':>10}{'speed-up':>10}"
             f"{'FLOP pred':>10}{'of pred':>8}{'RNoPE MB':>10}{'other MB':>10}"]
    for r in data:
        pred = f"{r['flop_speedup']:.2f}" if r["flop_speedup"] else "-"
        frac = f"{r['fraction_of_flop_speedup']:.0%}" if r["fraction_of_flop_speedup"] else "-"
        lines.append(f"{r['kind']:<18}{r['seq_len']:>7}{r['window']:>6}{r['ratio']:>5}{r['rnope_ms']:>10.1f}"
                     f"{r['other_ms']:>10.1f}{r['measured_speedup']:>10.2f}{pred:>10}{frac:>8}"
                     f"{r['rnope_peak_mb']:>10.0f}{r['other_peak_mb']:>10.0f}")
    return "\n".join(lines)


def plot(data: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ratio in sorted({r["ratio"] for r in data if r["kind"] == "vs RoPE baseline"}):
        sel = [r for r in data if r["kind"] == "vs RoPE baseline" and r["ratio"] == ratio]
        xs = [r["seq_len"] for r in sel]
        ax1.plot(xs, [r["measured_speedup"] for r in sel], marker="o", label=f"measured, L/W={ratio}")
        ax1.plot(xs, [r["flop_speedup"] for r in sel], linestyle="--", label=f"FLOP model, L/W={ratio}")
        ax2.plot(xs, [r["rnope_peak_mb"] for r in sel], marker="o", label=f"RNoPE-SWA, L/W={ratio}")
        ax2.plot(xs, [r["other_peak_mb"] for r in sel], marker="x", label=f"RoPE baseline, L/W={ratio}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.legend(fontsize=7)
    ax1.set_ylabel("step-time speed-up over all-global RoPE")
    ax2.set_ylabel("peak memory growth (MB)")
    fig.suptitle("training step, portable backend")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--ratios", type=int, nargs="+", default=[16, 32], help="L/W values")
    parser.add_argument("--hf-lengths", type=int, nargs="*", default=[], help="e.g. 8192 16384")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--png")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    data = rows(args)
    print(json.dumps(data, indent=2) if args.json else table(data))
    if args.png:
        plot(data, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
