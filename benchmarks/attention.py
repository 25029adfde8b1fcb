"""Sliding-window vs global attention on the portable backend: time and peak memory.

For each sequence length L the attention core of one sliding-window layer and of one
global causal layer runs forward + backward on identical [1, H, L, D] inputs; the table
puts the measured speed ratio next to the FLOP ratio (key visits of causal global
attention over sliding-window attention at the same L, counted exactly:
L(L+1)/2  over  W·L − W(W−1)/2, ≈ L/2W). Two sweeps: fixed W, and fixed L/W.

Each measurement runs in a fresh subprocess so that its peak-RSS growth is its own
(CPU); on CUDA, torch.cuda.max_memory_allocated is used. Ratios are taken inside one run;
absolute times on shared machines are noise.

    python benchmarks/attention.py                 # table
    python benchmarks/attention.py --json          # JSON list of rows
    python benchmarks/attention.py --png out.png   # also a plot
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROW_KEYS = ("sweep", "seq_len", "window", "swa_ms", "global_ms", "measured_ratio", "flop_ratio",
            "fraction_of_flop_ratio", "swa_peak_mb", "global_peak_mb")


def flop_ratio(seq: int, window: int) -> float:
    """Key visits of causal global attention over sliding-window attention."""
    window = min(window, seq)
    return (seq * (seq + 1) / 2) / (window * seq - window * (window - 1) / 2)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(spec: dict) -> dict:
    """Time one kernel (fwd+bwd) and measure its peak memory growth; runs in a subprocess."""
    import torch

    from rnope_megatron.attention.sliding_window import causal_attention, sliding_window_attention

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(1, spec["heads"], spec["seq_len"], spec["head_dim"], generator=gen, dtype=dtype)
        .to(device).requires_grad_()
        for _ in range(3)
    )
    window = spec["window"]
    if window:
        run = lambda: sliding_window_attention(q, k, v, window)  # noqa: E731
    else:
        run = lambda: causal_attention(q, k, v)  # noqa: E731

    def step():
        out = run()
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        step()  # compile / autotune outside the measurement
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_mb()
        step()  # first call: its RSS high-water mark is this kernel's peak
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": min(times), "median_ms": statistics.median(times), "peak_mb": max(peak_mb, 0.0)}


def measure(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    base = dict(heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, device=args.device,
                repeats=args.repeats)
    plan = [("fixed_window", L, args.window) for L in args.seq_lens]
    plan += [("fixed_ratio", L, max(1, L // args.ratio)) for L in args.seq_lens]
    global_cache: dict[int, dict] = {}
    rows = []
    total = len(plan)
    started = time.time()
    for index, (sweep, seq, window) in enumerate(plan, start=1):
        if seq not in global_cache:  # the global layer does not depend on W
            global_cache[seq] = measure(dict(base, seq_len=seq, window=0))
        swa = measure(dict(base, seq_len=seq, window=window))
        glob = global_cache[seq]
        ratio, flops = glob["ms"] / swa["ms"], flop_ratio(seq, window)
        rows.append(dict(
            sweep=sweep, seq_len=seq, window=window, swa_ms=round(swa["ms"], 2),
            global_ms=round(glob["ms"], 2), measured_ratio=round(ratio, 3),
            flop_ratio=round(flops, 3), fraction_of_flop_ratio=round(ratio / flops, 3),
            swa_peak_mb=round(swa["peak_mb"], 1), global_peak_mb=round(glob["peak_mb"], 1),
        ))
        if not args.json:
            elapsed = time.time() - started
            eta = elapsed / index * (total - index)
            print(f"  [{index}/{total}] {sweep} L={seq} W={window}  ({elapsed:.0f}s, eta {eta:.0f}s)",
                  file=sys.stderr, flush=True)
    return rows


def print_table(rows, args) -> None:
    print(f"portable attention, fwd+bwd, 1 x {args.heads} heads x d{args.head_dim}, {args.dtype}, "
          f"{args.device}, best of {args.repeats}")
    head = f"{'sweep':<13}{'L':>7}{'W':>6}{'SWA ms':>10}{'global ms':>11}{'measured':>10}" \
           f"{'FLOP':>8}{'fraction':>10}{'SWA MB':>9}{'global MB':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['sweep']:<13}{r['seq_len']:>7}{r['window']:>6}{r['swa_ms']:>10.1f}{r['global_ms']:>11.1f}"
              f"{r['measured_ratio']:>10.2f}{r['flop_ratio']:>8.2f}{r['fraction_of_flop_ratio']:>10.2f}"
              f"{r['swa_peak_mb']:>9.1f}{r['global_peak_mb']:>11.1f}")
    goal = [r for r in rows if r["sweep"] == "fixed_ratio"]
    if goal:
        r = goal[-1]
        print(f"\nat L/W={args.ratio}, L={r['seq_len']}: {r['fraction_of_flop_ratio']:.2f} x the FLOP ratio "
              f"(goal >= 0.8)")


def write_png(rows, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sweep, label in (("fixed_window", f"W={args.window}"), ("fixed_ratio", f"L/W={args.ratio}")):
        part = [r for r in rows if r["sweep"] == sweep]
        xs = [r["seq_len"] for r in part]
        axes[0].plot(xs, [r["measured_ratio"] for r in part], "o-", label=f"measured, {label}")
        axes[0].plot(xs, [r["flop_ratio"] for r in part], "--", label=f"FLOP ratio, {label}")
        axes[1].plot(xs, [r["swa_peak_mb"] for r in part], "o-", label=f"SWA, {label}")
    glob = {r["seq_len"]: r["global_peak_mb"] for r in rows}
    axes[1].plot(sorted(glob), [glob[x] for x in sorted(glob)], "s-", label="global causal")
    for ax, title in zip(axes, ("speed-up of SWA over global (fwd+bwd)", "peak memory growth (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--window", type=int, default=512, help="W of the fixed-window sweep")
    parser.add_argument("--ratio", type=int, default=32, help="L/W of the fixed-ratio sweep")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    parser.add_argument("--png", help="write a plot to this path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    rows = run(args)
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows, args)
    if args.png:
        write_png(rows, args.png, args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
