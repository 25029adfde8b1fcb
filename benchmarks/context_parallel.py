"""Context parallelism on the portable backend: one sliding-window (S) and one global (G)
layer's attention, forward + backward, at CP = 1, 2, 4.

Each configuration runs in CP fresh processes (gloo on CPU, NCCL on GPUs) holding
Megatron's load-balanced chunks of one [1, H, L, D] sequence; CP = 1 is the plain kernel.
Per row: the slowest rank's time (median of --repeats after a warm-up), the largest
per-rank peak-memory growth of the first call (the allocator's peak from the profiler's
allocation events on CPU, max allocated on CUDA), and
the bytes one rank sends per fwd+bwd — counted on every collective call: point-to-point
halo messages as sent; an all-gather as (CP−1) x the rank's share, an all-reduce and a
reduce-scatter as ring algorithms move them (2(CP−1)/CP and (CP−1)/CP of the tensor), a
reduce to one rank as the tensor once from every other rank, a broadcast (gloo's gather)
as (CP−1) x the tensor from its root.
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
import statistics
import sys
import tempfile
import time

ROW_KEYS = ("layer", "seq_len", "window", "cp", "ms", "peak_mb", "sent_mb_per_rank", "device")


def _count_traffic(dist, sent: dict) -> None:
    """Wrap the collectives context_parallel.py calls to count this rank's bytes."""
    real_batch, real_gather, real_into = dist.batch_isend_irecv, dist.all_gather, dist.all_gather_into_tensor
    real_reduce, real_scatter, real_to_one = dist.all_reduce, dist.reduce_scatter_tensor, dist.reduce

    def size_of(tensor):
        return tensor.numel() * tensor.element_size()

    def batch(ops):
        sent["bytes"] += sum(size_of(op.tensor) for op in ops if op.op is dist.isend)
        return real_batch(ops)

    def gather(outputs, tensor, *args, **kwargs):
        sent["bytes"] += (len(outputs) - 1) * size_of(tensor)
        return real_gather(outputs, tensor, *args, **kwargs)

    def gather_into(output, tensor, *args, group=None, **kwargs):
        sent["bytes"] += (dist.get_world_size(group) - 1) * size_of(tensor)
        return real_into(output, tensor, *args, group=group, **kwargs)

    real_broadcast = dist.broadcast

    def broadcast(tensor, src, *args, group=None, **kwargs):  # the root sends to every other rank
        sent["bytes"] += (dist.get_world_size(group) - 1) * size_of(tensor) if src == dist.get_rank() else 0
        return real_broadcast(tensor, src, *args, group=group, **kwargs)

    def reduce_to_one(tensor, dst, *args, **kwargs):  # a non-root rank sends its tensor once
        sent["bytes"] += 0 if dst == dist.get_rank() else size_of(tensor)
        return real_to_one(tensor, dst, *args, **kwargs)

    def reduce(tensor, *args, group=None, **kwargs):
        world = dist.get_world_size(group)
        sent["bytes"] += 2 * (world - 1) / world * size_of(tensor)
        return real_reduce(tensor, *args, group=group, **kwargs)

    def scatter(output, tensor, *args, group=None, **kwargs):
        world = dist.get_world_size(group)
        sent["bytes"] += (world - 1) / world * size_of(tensor)
        return real_scatter(output, tensor, *args, group=group, **kwargs)

    dist.batch_isend_irecv, dist.all_gather, dist.all_reduce, dist.reduce_scatter_tensor = batch, gather, reduce, scatter
    dist.all_gather_into_tensor, dist.reduce, dist.broadcast = gather_into, reduce_to_one, broadcast


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
        step()  # the first call: its high-water mark is this configuration's peak
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        from torch.profiler import ProfilerActivity, profile

        from rnope_megatron.plan.measured import allocator_peak

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step()
        peak = allocator_peak(profiler) / 2**20
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


def model_shape(seq_len: int, window: int, hidden: int = 128, heads: int = 4, groups: int = 2,
                ffn: int = 256, vocab: int = 96, pattern: str = "SSSG") -> dict:
    """The tiny test model's shape (4 layers SSSG, GQA 2, small vocabulary) widened so
    that the layers' activations, not the weights or the logits, make the peak."""
    return dict(num_layers=len(pattern), hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                ffn_hidden_size=ffn, vocab_size=vocab, max_seq_length=seq_len, window=window, pattern=pattern)


def model_peak(rank: int, world_size: int, port: int, model_kwargs: dict, seq_len: int, repeats: int = 0) -> dict:
    """One CP rank of the whole model (gloo on CPU, fp32, portable backend): the
    allocator's peak over one forward+backward of one sequence on top of the weights
    (``peak``, bytes), then ``repeats`` timed steps (``ms``, median) and the bytes this
    rank sent per step (``sent``). CP = ``world_size``; 1 is the one-process oracle.
    A ``run_distributed`` worker (tests use it too)."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from rnope_megatron.attention.context_parallel import ZigZag
    from rnope_megatron.common.distributed import initialize_parallel
    from rnope_megatron.model.build import build_model
    from rnope_megatron.model.config import ParallelLayout, RNoPEConfig
    from rnope_megatron.plan.measured import allocator_peak

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    layout = ParallelLayout(context=world_size)
    initialize_parallel(layout, seed=1, rank=rank, world_size=world_size)
    cfg = RNoPEConfig(**model_kwargs)
    model = build_model(cfg, cfg.to_transformer_config(layout), pre_process=True, post_process=True)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    if world_size > 1:  # Megatron's load-balanced split: this rank's two chunks
        mine = ZigZag(world_size, rank, seq_len // (2 * world_size)).local_positions()
        ids, labels = ids[:, mine], labels[:, mine]
    positions = torch.arange(ids.shape[1])[None]

    def step():
        loss = model(ids, positions, None, labels=labels).sum() / seq_len  # this rank's share
        loss.backward()
        for param in model.parameters():
            param.grad = None
        return loss.detach()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss = step()
    if world_size > 1:
        dist.all_reduce(loss)
    result = {"peak": allocator_peak(profiler), "ms": 0.0, "sent": 0.0, "loss": loss.item()}
    if repeats:
        sent, times = {"bytes": 0}, []
        if world_size > 1:
            _count_traffic(dist, sent)
        for _ in range(repeats):
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1000)
        result.update(ms=statistics.median(times), sent=sent["bytes"] / repeats)
    return result


def gathered_kv_bytes(model_kwargs: dict, seq_len: int, dtype_bytes: int = 4) -> int:
    """K and V of the whole sequence for one global layer (what an all-gather brings in)."""
    kv = model_kwargs["num_query_groups"] * model_kwargs["hidden_size"] // model_kwargs["num_attention_heads"]
    return seq_len * 2 * kv * dtype_bytes


def plan_estimate(model_kwargs: dict, seq_len: int, cp: int) -> float:
    """rnope-plan's memory model for the same step: activations kept, the layer running
    backward with CP's transient buffers, the logits, and the parameters' gradients."""
    import types

    from rnope_megatron.model.config import RNoPEConfig
    from rnope_megatron.plan.memory import Setup, stage_memory

    cfg = RNoPEConfig(**model_kwargs)
    comm = dict(zip(cfg.layer_pattern.layers, cfg.cp_comm_types(types.SimpleNamespace(
        context_comm_sliding=None, context_comm_global=None), "portable")))
    setup = Setup(dtype_bytes=4, backend="portable", fused=False, distributed_optimizer=False, recompute=None,
                  tensor=1, pipeline=1, virtual=None, context=cp, sequence_parallel=False, data_parallel=1,
                  micro_batch=1, seq_length=seq_len, num_microbatches=1, on_gpu=False,
                  comm_sliding=comm.get("S"), comm_global=comm.get("G", comm.get("R")))
    parts = stage_memory(types.SimpleNamespace(model=cfg), setup, 0).components
    return parts["activations"] + parts["transient"] + parts["logits"] + parts["grads"]


def measure_model(seq_len: int, window: int, cp: int, repeats: int, shape: dict) -> dict:
    """A whole-model row: the largest per-rank peak, the slowest rank's time, bytes sent."""
    from rnope_megatron.common.distributed import free_port

    model_kwargs = model_shape(seq_len, window, **shape)
    with tempfile.TemporaryDirectory() as out_dir:
        import torch.multiprocessing as mp

        mp.spawn(_model_entry, args=(cp, free_port(), out_dir, model_kwargs, seq_len, repeats), nprocs=cp, join=True)
        ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(cp)]
    return dict(layer="model", seq_len=seq_len, window=window, cp=cp, ms=round(max(r["ms"] for r in ranks), 1),
                peak_mb=round(max(r["peak"] for r in ranks) / 2**20, 1),
                sent_mb_per_rank=round(max(r["sent"] for r in ranks) / 2**20, 3), device="cpu",
                gathered_kv_mb=round(gathered_kv_bytes(model_kwargs, seq_len) / 2**20, 1),
                plan_mb=round(plan_estimate(model_kwargs, seq_len, cp) / 2**20, 1))


def _model_entry(rank, cp, port, out_dir, model_kwargs, seq_len, repeats):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    result = model_peak(rank, cp, port, model_kwargs, seq_len, repeats)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def with_bounds(rows) -> list[dict]:
    """Each whole-model row's bound: 1.25 x (CP=1 peak / CP) + one global layer's gathered
    K/V, and the measured peak over it (<= 1 meets it)."""
    single = {r["seq_len"]: r["peak_mb"] for r in rows if r["layer"] == "model" and r["cp"] == 1}
    for r in rows:
        if r["layer"] == "model" and r["seq_len"] in single:
            bound = 1.25 * single[r["seq_len"]] / r["cp"] + (r["gathered_kv_mb"] if r["cp"] > 1 else 0)
            r.update(bound_mb=round(bound, 1), peak_over_bound=round(r["peak_mb"] / bound, 3),
                     plan_error=round(r["plan_mb"] / r["peak_mb"] - 1, 3))
    return rows


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
    print(f"{'layer':<6}{'L':>7}{'W':>6}{'CP':>4}{'fwd+bwd ms':>12}{'peak MB/rank':>14}{'sent MB/rank':>14}"
          f"{'bound MB':>10}{'peak/bound':>11}{'plan MB':>9}{'plan err':>9}")
    for r in rows:
        extra = ""
        if "bound_mb" in r:
            extra = f"{r['bound_mb']:>10.1f}{r['peak_over_bound']:>11.3f}{r['plan_mb']:>9.1f}{r['plan_error']:>+9.1%}"
        print(f"{r['layer']:<6}{r['seq_len']:>7}{r['window'] or '-':>6}{r['cp']:>4}{r['ms']:>12.1f}"
              f"{r['peak_mb']:>14.1f}{r['sent_mb_per_rank']:>14.3f}{extra}")


def write_png(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for layer, style in (("S", "-"), ("G", "--"), ("model", ":")):
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
    parser.add_argument("--layers", nargs="+", default=["S", "G", "model"], choices=["S", "G", "model"],
                        help="one sliding layer, one global layer, the whole model (CPU: peak by the allocator)")
    parser.add_argument("--hidden", type=int, default=128, help="whole model: hidden size (heads as --heads)")
    parser.add_argument("--ffn", type=int, default=256, help="whole model: MLP size")
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
                if layer == "model":
                    if args.device != "cpu":
                        raise SystemExit("--layers model measures the CPU allocator: use --device cpu")
                    shape = dict(hidden=args.hidden, heads=args.heads, ffn=args.ffn)
                    rows.append(measure_model(seq, args.window, cp, args.repeats, shape))
                else:
                    spec = dict(layer=layer, seq_len=seq, window=args.window, cp=cp, heads=args.heads,
                                head_dim=args.head_dim, repeats=args.repeats, device=args.device)
                    rows.append(measure(spec))
                if not args.json:
                    print(f"  measured {layer} L={seq} CP={cp}: {rows[-1]['ms']} ms", file=sys.stderr, flush=True)
    rows = with_bounds(rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    if args.png:
        write_png(rows, args.png)


if __name__ == "__main__":
    main()
