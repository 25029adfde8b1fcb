"""GPU checks for a machine with CUDA (not run in CI): the portable backend's CUDA path.

1. FlexAttention sliding window vs a dense float64 reference, forward and gradients.
2. The whole model on CUDA vs the same weights on CPU (logits).
3. The CPU compat layer stays off when CUDA is available.
4. rnope-train on one GPU (torchrun, NCCL, distributed optimizer, CUDA fusions without
   TE): fp32 per-iteration losses vs a CPU run of the same recipe on the same data
   (``--cpu-reference DIR`` holding that run's ``metrics.jsonl`` and its ``data/`` cache,
   made with ``tools/gpu_check.sh --prepare`` on a CPU machine), then a bf16 run.
5. The CUDA kernels context parallelism runs on one rank: sliding window with a halo
   (queries at the end of longer keys; FlexAttention with an offset mask) and causal
   attention against earlier chunks (SDPA's causal_lower_right), vs a float64 reference.
   (Multi-rank CP over NCCL needs two GPUs; the TE halo wrapper needs TE.)
6. benchmarks/attention.py on CUDA (bf16): S vs full attention against the FLOP ratio at
   4k-128k (32k and 64k included), printed as a table (--quick: 32k only); and the MFU of
   the 1B recipe's layer shape (``check_layer_mfu``).
7. With ``--te`` (Transformer Engine installed): the checks of ``tools/gpu_check_te.py``
   (te vs portable, rnope-train on te in bf16 and FP8 with a resume, the refusal of FP8
   attention on sliding layers, TE's backend per layer).

Each check runs on even if an earlier one failed; the summary table says which held.
``--dry-run`` (any machine, no GPU): lists the checks and validates every recipe they
would train, with the expected refusals, for the lent GPU (h200).

    python tools/gpu_check.py [--quick] [--te] [--cpu-reference DIR] | --dry-run
"""

import argparse
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The recipe and overrides of the CPU reference run (tools/gpu_check.sh --prepare).
TRAIN_OVERRIDES = ["train.iters=10", "logging.interval=1", "checkpoint.interval=5", "logging.tensorboard=false"]
# The portable trainer runs of check_trainer, for --dry-run (label, overrides, expected refusal).
PORTABLE_RUNS = [("portable fp32 (stopped at 5, resumed)", [*TRAIN_OVERRIDES, "train.stop_at=5"], None),
                 ("portable bf16", [*TRAIN_OVERRIDES, "train.precision=bf16"], None)]


def check_flex(results):
    """FlexAttention sliding window vs a float64 reference, forward and gradients."""
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
        results.append((f"flex SWA fwd+bwd L={seq} W={window} H={heads}/{groups}", err, err < 2e-3))


def check_offset_kernels(results):
    """Queries that are the last Lq of Lk keys, as a context-parallel chunk sees them."""
    from rnope_megatron.attention.sliding_window import causal_attention, sliding_window_attention, sliding_window_mask

    for q_len, k_len, window in [(512, 639, 128), (1000, 1511, 512), (256, 1280, None)]:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 64, generator=g) for h, n in ((8, q_len), (2, k_len), (2, k_len)))
        gpu = [x.cuda().requires_grad_() for x in (q, k, v)]
        out = sliding_window_attention(*gpu, window) if window else causal_attention(*gpu)
        out.sum().backward()
        ref_in = [x.double().requires_grad_() for x in (q, k, v)]
        kk, vv = (x.repeat_interleave(4, 1) for x in ref_in[1:])
        mask = sliding_window_mask(q_len, window or k_len, kv_len=k_len)
        ref = torch.softmax((ref_in[0] @ kk.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf")), -1) @ vv
        ref.sum().backward()
        err = max((out.double().cpu() - ref).abs().max().item(),
                  *((a.grad.double().cpu() - b.grad).abs().max().item() for a, b in zip(gpu, ref_in)))
        name = f"W={window}" if window else "global"
        results.append((f"CP chunk on CUDA ({name}) Lq={q_len} Lk={k_len} fwd+bwd", err, err < 2e-3))


def check_model(results):
    """The whole portable model on CUDA vs the same weights on CPU (fp32 logits)."""
    from rnope_megatron import ParallelLayout, RNoPEConfig, build_model
    from rnope_megatron.common.distributed import initialize_parallel, shutdown_parallel
    from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor

    initialize_parallel(ParallelLayout())
    try:
        cfg = RNoPEConfig(num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                          vocab_size=512, max_seq_length=1024, window=128)
        model = build_model(cfg, cfg.to_transformer_config())
        fill_from_global(model, seeded_full_tensor(7))
        ids = torch.randint(0, 512, (2, 1024))
        pos = torch.arange(1024).expand(2, -1)
        with torch.no_grad():
            gpu = model.cuda()(ids.cuda(), pos.cuda(), None).cpu()
            cpu = model.cpu()(ids, pos, None)
        err = (gpu - cpu).abs().max().item()
        results.append(("model logits CUDA vs CPU (fp32)", err, err < 1e-2))
    finally:
        shutdown_parallel()


def check_layer_mfu(results):
    """MFU of the 1B recipe's layer shape: one SSSG block in bf16 on this GPU, fwd+bwd at 8k."""
    import dataclasses

    import yaml

    from rnope_megatron import ParallelLayout, RNoPEConfig, build_model
    from rnope_megatron.common import gpus
    from rnope_megatron.common.distributed import initialize_parallel, shutdown_parallel
    from rnope_megatron.model.flops import training_flops_per_token

    shape = yaml.safe_load((ROOT / "recipes" / "models" / "llama-1b-like.yaml").read_text())
    cfg = dataclasses.replace(RNoPEConfig(**shape), num_layers=4, max_seq_length=8192)
    seq = 8192
    initialize_parallel(ParallelLayout())
    try:
        model = build_model(cfg, cfg.to_transformer_config(params_dtype="bf16")).cuda()
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
        pos = torch.arange(seq, device="cuda").unsqueeze(0)
        for step in range(4):  # the first steps compile Flex's kernels and warm the allocator
            if step == 1:
                torch.cuda.synchronize()
                start = time.time()
            model(ids, pos, None).float().sum().backward()
        torch.cuda.synchronize()
        seconds = (time.time() - start) / 3
        tflops = training_flops_per_token(cfg, seq) * seq / seconds / 1e12
        peak = (gpus.detect() or gpus.by_name("h100")).bf16_tflops
        results.append((f"1B layer shape x4 (SSSG) bf16 L=8k: {tflops:.0f} TFLOP/s, MFU", tflops / peak,
                        math.isfinite(tflops)))
    finally:
        shutdown_parallel()


def check_compat(results):
    """The CPU compat layer stays off when CUDA is available."""
    from rnope_megatron.compat import cpu as compat

    active = compat.enable()
    results.append(("CPU compat layer off with CUDA (enable() is a no-op)", float(active or compat.is_active()),
                    not active and not compat.is_active() and torch.Tensor.cuda is compat._original_tensor_cuda))


def _train(run_dir, data_dir, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "rnope_megatron.train", str(ROOT / "recipes" / "tiny-cpu.yaml"), *TRAIN_OVERRIDES,
           f"logging.run_dir={run_dir}", f"data.cache_dir={data_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"rnope-train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(proc.stdout[-1500:], flush=True)
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["iteration"]: m["loss"] for m in map(json.loads, lines)}


def check_trainer(results, reference):
    """rnope-train on one GPU (portable): fp32 losses vs the CPU reference run, resumed at 5; bf16."""
    reference = pathlib.Path(reference)
    cpu = {m["iteration"]: m["loss"] for m in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())}
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"  # a copy: the dataset index cache is written there
        subprocess.run(["cp", "-r", str(reference / "data"), str(data)], check=True)
        # stopped at 5 and resumed: the distributed optimizer's checkpoint round trip on CUDA
        _train(pathlib.Path(tmp) / "fp32", data, "train.stop_at=5")
        fp32 = _train(pathlib.Path(tmp) / "fp32", data)
        err = max(abs(fp32[i] - cpu[i]) for i in cpu)
        print("iter  cpu fp32  gpu fp32", *(f"{i:4d}  {cpu[i]:.5f}  {fp32[i]:.5f}" for i in sorted(cpu)), sep="\n")
        results.append((f"rnope-train 1 GPU fp32 (resumed at 5) vs CPU, {len(cpu)} iters", err,
                        err < 2e-3 and fp32.keys() == cpu.keys()))
        bf16 = _train(pathlib.Path(tmp) / "bf16", data, "train.precision=bf16")
        err = max(abs(bf16[i] - fp32[i]) for i in fp32)
        finite = all(math.isfinite(x) for x in bf16.values())
        results.append(("rnope-train 1 GPU bf16 vs fp32 (loss, loose)", err, finite and err < 0.1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpu-reference", help="folder with a CPU run's metrics.jsonl and data/")
    parser.add_argument("--te", action="store_true", help="also the Transformer Engine checks (needs TE)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks, validate their recipes; no GPU")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check_te

    checks = [check_compat, check_flex, check_offset_kernels, check_model, check_layer_mfu]
    if args.cpu_reference or args.dry_run:
        checks.append(functools.partial(check_trainer, reference=args.cpu_reference))
    if args.te or args.dry_run:
        checks += gpu_check_te.CHECKS
    if args.dry_run:
        print("checks:")
        for check in checks:
            function = getattr(check, "func", check)
            print(f"  {function.__name__}: {(function.__doc__ or '').strip().splitlines()[0] if function.__doc__ else ''}")
        print("  benchmarks/attention.py on CUDA (bf16)")
        print(f"recipes (recipes/tiny-cpu.yaml + overrides), checked for {gpu_check_te.DRY_RUN_GPU}:")
        sys.exit(0 if gpu_check_te.dry_run(PORTABLE_RUNS + gpu_check_te.RUNS) else 1)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script is for a GPU machine")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    results = []
    if not args.te:
        print("TE checks not requested (--te)", flush=True)
    for check in checks:
        start = time.time()
        try:
            check(results)
        except Exception:  # report and go on: one run of this script must say as much as it can
            traceback.print_exc()
            results.append((f"{getattr(check, '__name__', 'check_trainer')} raised", float("nan"), False))
        print(f"-- {getattr(check, '__name__', 'check_trainer')}: {time.time() - start:.0f} s", flush=True)
    print(f"\n{'check':<58}{'max abs err':>14}  ok")
    for name, err, ok in results:
        print(f"{name:<58}{err:>14.2e}  {'yes' if ok else 'NO'}")
    sys.stdout.flush()
    lens = ["32768"] if args.quick else ["4096", "16384", "32768", "65536", "131072"]
    bench = subprocess.run([sys.executable, "benchmarks/attention.py", "--device", "cuda", "--dtype", "bfloat16",
                            "--window", "4096", "--ratio", "32", "--heads", "32", "--head-dim", "128",
                            "--seq-lens", *lens, "--png", os.path.join(os.environ.get("OUT", "/tmp"), "gpu_bench.png")])
    sys.exit(0 if all(ok for *_, ok in results) and bench.returncode == 0 else 1)


if __name__ == "__main__":
    main()
