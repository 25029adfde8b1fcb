"""Sliding-window vs global attention on the portable backend: time and peak memory.

For each sequence length L the attention core of one sliding-window layer and of one
global causal layer runs forward + backward on identical [1, H, L, D] inputs; the table
puts the measured speed ratio next to the FLOP ratio (key visits of causal global
attention over sliding-window attention at the same L, counted exactly:
L(L+1)/2  over  W·L − W(W−1)/2, ≈ L/2W). Two sweeps: fixed W, and fixed L/W.

Peak memory is measured in a fresh subprocess per kernel so that its peak-RSS growth is
its own (CPU); on CUDA, torch.cuda.max_memory_allocated is used. Times come from one
subprocess per row that alternates the two kernels (best of --repeats after a warm-up),
so the ratio is taken under one machine load; short calls get more pairs (--min-time).
Absolute times on shared machines are noise.

`stream ms` is a floor under both kernels: the time elementwise torch ops take, in the same
loop, to read and write the tensors one fwd+bwd call must touch (forward: read q, k, v,
write out; backward: read q, k, v, out, dO, write dq, dk, dv). The global layer does L/2W
times the sliding-window layer's arithmetic on the same bytes, so at small W this floor is
a sizeable part of the sliding-window call and a negligible part of the global one.

    python benchmarks/attention.py                 # table
    python benchmarks/attention.py --json          # JSON list of rows
    python benchmarks/attention.py --png out.png   # also a plot
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROW_KEYS = ("sweep", "seq_len", "window", "swa_ms", "global_ms", "measured_ratio", "flop_ratio",
            "fraction_of_flop_ratio", "swa_peak_mb", "global_peak_mb", "stream_ms", "swa_kernel")


def flop_ratio(seq: int, window: int) -> float:
    """Key visits of causal global attention over sliding-window attention."""
    window = min(window, seq)
    return (seq * (seq + 1) / 2) / (window * seq - window * (window - 1) / 2)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(spec: dict) -> dict:
    """Runs in a subprocess. ``mode="memory"``: peak memory growth of one kernel's first
    fwd+bwd (``window=0`` is the global layer). ``mode="time"``: that peak for the
    sliding-window kernel, then fwd+bwd times of the sliding-window and the global kernel, alternated after one warm-up call each, so that
    both see the same machine load (timings on shared machines drift by 2x)."""
    import torch

    from rnope_megatron.attention.native_cpu import native_kernel_usable
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
    if device.type != "cpu":
        kernel = "flex"
    else:  # also builds/loads the native kernel before any measurement
        kernel = "native" if native_kernel_usable(dtype) else "sdpa-blocked"

    def step(window):
        start = time.perf_counter()
        out = sliding_window_attention(q, k, v, window) if window else causal_attention(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def peak_memory_mb(window) -> float:  # the first kernel call of this process
        if device.type == "cuda":
            step(window)  # compile / autotune outside the measurement
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(window)
            return max((torch.cuda.max_memory_allocated() - base) / 2**20, 0.0)
        base = _rss_mb()
        step(window)  # first call: its RSS high-water mark is this kernel's peak
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 0.0)

    # The kernel measured first in a fresh process owns its peak: the sliding-window one
    # in a "time" worker, before the timing loop (one process fewer per row).
    peak_mb = peak_memory_mb(window)
    if spec["mode"] == "memory":
        return {"peak_mb": peak_mb, "kernel": kernel}
    def stream():  # the bytes a fwd+bwd call moves at least (see the module docstring)
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.addcmul(q, k, v)  # forward: q, k, v -> out
            grad = torch.ones_like(out)  # dO, as step() makes it
            torch.addcmul(q, k, v), torch.add(out, grad), torch.zeros_like(q)  # -> dq, dk, dv
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    step(window), step(0), stream()  # warm-up: allocator, page faults, compilation
    swa, glob, floor = [], [], []
    started = time.perf_counter()
    # At least `repeats` pairs, and more while under `min_time` s: the best of 3 is a poor
    # estimate for a 10 ms call on a shared machine, and 30 pairs of the 30 s calls at
    # L = 32k would take half an hour.
    while len(swa) < spec["repeats"] or (time.perf_counter() - started < spec["min_time"] and len(swa) < 100):
        swa.append(step(window))
        glob.append(step(0))
        floor.append(stream())
    return {"swa_ms": min(swa), "global_ms": min(glob), "stream_ms": min(floor), "kernel": kernel,
            "peak_mb": peak_mb}


def measure(spec: dict, cpu_kernel: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               RNOPE_SWA_CPU_KERNEL=cpu_kernel)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    base = dict(heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, device=args.device,
                repeats=args.repeats, min_time=args.min_time)
    plan = [("fixed_window", L, args.window) for L in args.seq_lens]
    plan += [("fixed_ratio", L, max(1, L // args.ratio)) for L in args.seq_lens]
    memory_cache: dict[int, dict] = {}
    rows = []
    total = len(plan)
    started = time.time()
    for index, (sweep, seq, window) in enumerate(plan, start=1):
        if seq not in memory_cache:  # the global layer does not depend on W
            memory_cache[seq] = measure(dict(base, mode="memory", seq_len=seq, window=0), args.cpu_kernel)
        timing = measure(dict(base, mode="time", seq_len=seq, window=window), args.cpu_kernel)
        ratio, flops = timing["global_ms"] / timing["swa_ms"], flop_ratio(seq, window)
        rows.append(dict(
            sweep=sweep, seq_len=seq, window=window, swa_ms=round(timing["swa_ms"], 2),
            global_ms=round(timing["global_ms"], 2), measured_ratio=round(ratio, 3),
            flop_ratio=round(flops, 3), fraction_of_flop_ratio=round(ratio / flops, 3),
            swa_peak_mb=round(timing["peak_mb"], 1),
            global_peak_mb=round(memory_cache[seq]["peak_mb"], 1),
            stream_ms=round(timing["stream_ms"], 2), swa_kernel=timing["kernel"],
        ))
        if not args.json:
            elapsed = time.time() - started
            eta = elapsed / index * (total - index)
            print(f"  [{index}/{total}] {sweep} L={seq} W={window}  ({elapsed:.0f}s, eta {eta:.0f}s)",
                  file=sys.stderr, flush=True)
    return rows


def print_table(rows, args) -> None:
    kernels = sorted({r["swa_kernel"] for r in rows})
    print(f"portable attention, fwd+bwd, 1 x {args.heads} heads x d{args.head_dim}, {args.dtype}, "
          f"{args.device}, best of >= {args.repeats} alternated pairs (>= {args.min_time:g} s per row); "
          f"sliding-window kernel: {', '.join(kernels)}")
    head = f"{'sweep':<13}{'L':>7}{'W':>6}{'SWA ms':>10}{'global ms':>11}{'measured':>10}" \
           f"{'FLOP':>8}{'fraction':>10}{'SWA MB':>9}{'global MB':>11}{'stream ms':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['sweep']:<13}{r['seq_len']:>7}{r['window']:>6}{r['swa_ms']:>10.1f}{r['global_ms']:>11.1f}"
              f"{r['measured_ratio']:>10.2f}{r['flop_ratio']:>8.2f}{r['fraction_of_flop_ratio']:>10.2f}"
              f"{r['swa_peak_mb']:>9.1f}{r['global_peak_mb']:>11.1f}{r['stream_ms']:>11.2f}")
    goal = [r for r in rows if r["sweep"] == "fixed_ratio"]
    if goal:
        fractions = ", ".join(f"L={r['seq_len']}: {r['fraction_of_flop_ratio']:.2f}" for r in goal)
        print(f"\nat L/W={args.ratio}, fraction of the FLOP ratio (goal >= 0.8): {fractions}")


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
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs at least (best is kept)")
    parser.add_argument("--min-time", type=float, default=3.0,
                        help="keep timing pairs (up to 100) until this many seconds have passed")
    parser.add_argument("--cpu-kernel", default="auto", choices=["auto", "native", "sdpa"],
                        help="CPU sliding-window kernel (RNOPE_SWA_CPU_KERNEL)")
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
