"""Context parallelism on the portable backend: one sliding-window (S) and one global (G)
layer's attention, forward + backward, at CP = 1, 2, 4.

Each configuration runs in CP fresh processes (gloo on CPU, NCCL on GPUs) holding
Megatron's load-balanced chunks of one [1, H, L, D] sequence; CP = 1 is the plain kernel.
Per row: the slowest rank's time (median of --repeats after a warm-up), the largest
per-rank peak-memory growth of the first call (peak RSS on CPU, max allocated on CUDA), and
the bytes one rank sends per fwd+bwd — counted on every collective call: point-to-point
halo messages as sent; an all-gather as (CP−1) x the rank's share, an all-reduce and a
reduce-scatter as ring algorithms move them (2(CP−1)/CP and (CP−1)/CP of the tensor).
The S layer's bytes stay flat as L grows (the W−1 rows before each chunk); the G layer's
grow with L. Absolute times on shared machines are noise; with more processes than cores
the CP rows measure correctness of the cost model, not speed.

    python benchmarks/context_parallel.py                       # table (L up to 32k)
    python benchmarks/context_parallel.py --json --png out.png  # rows as JSON, and a plot
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROW_KEYS = ("layer", "seq_len", "window", "cp", "ms", "peak_mb", "sent_mb_per_rank", "device")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _count_traffic(dist, sent: dict) -> None:
    """Wrap the collectives context_parallel.py calls to count this rank's bytes."""
    real_batch, real_gather = dist.batch_isend_irecv, dist.all_gather
    real_reduce, real_scatter = dist.all_reduce, dist.reduce_scatter_tensor

    def size_of(tensor):
        return tensor.numel() * tensor.element_size()

    def batch(ops):
        sent["bytes"] += sum(size_of(op.tensor) for op in ops if op.op is dist.isend)
        return real_batch(ops)

    def gather(outputs, tensor, *args, **kwargs):
        sent["bytes"] += (len(outputs) - 1) * size_of(tensor)
        return real_gather(outputs, tensor, *args, **kwargs)

    def reduce(tensor, *args, group=None, **kwargs):
        world = dist.get_world_size(group)
        sent["bytes"] += 2 * (world - 1) / world * size_of(tensor)
        return real_reduce(tensor, *args, group=group, **kwargs)

    def scatter(output, tensor, *args, group=None, **kwargs):
        world = dist.get_world_size(group)
        sent["bytes"] += (world - 1) / world * size_of(tensor)
        return real_scatter(output, tensor, *args, group=group, **kwargs)

    dist.batch_isend_irecv, dist.all_gather, dist.all_reduce, dist.reduce_scatter_tensor = batch, gather, reduce, scatter


def _rank(rank: int, spec: dict, port: int, out_dir: str) -> None:
    """One CP rank: its chunks of the sequence, warm-up, timed fwd+bwd calls."""
    import torch
    import torch.distributed as dist

    cp, device = spec["cp"], torch.device(spec["device"] if spec["device"] == "cpu" else f"cuda:{rank}")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    window = spec["window"] if spec["layer"] == "S" else None
    heads, dim, seq = spec["heads"], spec["head_dim"], spec["seq_len"]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(seq, 1, heads, dim, generator=gen) for _ in range(3)]
    if cp > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=cp)
        group = dist.group.WORLD
        chunk = seq // (2 * cp)
        mine = [torch.cat([x[rank * chunk:(rank + 1) * chunk], x[(2 * cp - 1 - rank) * chunk:(2 * cp - rank) * chunk]])
                for x in full]
    else:
        group, mine = None, full
    q, k, v = (x.to(device).requires_grad_() for x in mine)
    sent = {"bytes": 0}

    def step():
        from rnope_megatron.attention.context_parallel import context_parallel_attention
        from rnope_megatron.attention.sliding_window import causal_attention, sliding_window_attention

        if cp > 1:
            out = context_parallel_attention(q, k, v, window, dim ** -0.5, group)
        else:
            bhsd = [x.permute(1, 2, 0, 3) for x in (q, k, v)]
            out = sliding_window_attention(*bhsd, window) if window else causal_attention(*bhsd)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    step()  # the first call: its high-water mark is this configuration's peak
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if cp > 1:
        _count_traffic(dist, sent)
    times = []
    for _ in range(spec["repeats"]):
        if cp > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    result = {"ms": statistics.median(times), "peak_mb": max(peak, 0.0), "sent": sent["bytes"] / spec["repeats"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if cp > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(spec: dict) -> dict:
    import torch.multiprocessing as mp

    from rnope_megatron.common.distributed import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(spec, free_port(), out_dir), nprocs=spec["cp"], join=True)
        ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(spec["cp"])]
    return dict(
        layer=spec["layer"], seq_len=spec["seq_len"], window=spec["window"] if spec["layer"] == "S" else None,
        cp=spec["cp"], ms=round(max(r["ms"] for r in ranks), 1), peak_mb=round(max(r["peak_mb"] for r in ranks), 1),
        sent_mb_per_rank=round(max(r["sent"] for r in ranks) / 2**20, 3), device=spec["device"],
    )


def print_table(rows) -> None:
    print(f"{'layer':<6}{'L':>7}{'W':>6}{'CP':>4}{'fwd+bwd ms':>12}{'peak MB/rank':>14}{'sent MB/rank':>14}")
    for r in rows:
        print(f"{r['layer']:<6}{r['seq_len']:>7}{r['window'] or '-':>6}{r['cp']:>4}{r['ms']:>12.1f}"
              f"{r['peak_mb']:>14.1f}{r['sent_mb_per_rank']:>14.3f}")


def write_png(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for layer, style in (("S", "-"), ("G", "--")):
        for cp in sorted({r["cp"] for r in rows}):
            part = [r for r in rows if r["layer"] == layer and r["cp"] == cp]
            xs = [r["seq_len"] for r in part]
            label = f"{layer}, CP={cp}"
            axes[0].plot(xs, [r["ms"] for r in part], "o" + style, label=label)
            axes[1].plot(xs, [r["peak_mb"] for r in part], "o" + style, label=label)
            if cp > 1:
                axes[2].plot(xs, [r["sent_mb_per_rank"] for r in part], "o" + style, label=label)
    titles = ("fwd+bwd time (ms, slowest rank)", "peak memory growth per rank (MB)", "bytes sent per rank (MB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", nargs="+", default=["S", "G"], choices=["S", "G"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--png")
    args = parser.parse_args(argv)
    rows = []
    for layer in args.layers:
        for seq in args.seq_lens:
            for cp in args.cp:
                if seq % (2 * cp):
                    raise SystemExit(f"--seq-lens {seq} is not divisible by 2 x CP = {2 * cp}")
                spec = dict(layer=layer, seq_len=seq, window=args.window, cp=cp, heads=args.heads,
                            head_dim=args.head_dim, repeats=args.repeats, device=args.device)
                rows.append(measure(spec))
                if not args.json:
                    print(f"  measured {layer} L={seq} CP={cp}: {rows[-1]['ms']} ms", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    if args.png:
        write_png(rows, args.png)


if __name__ == "__main__":
    main()
