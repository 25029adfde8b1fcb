"""Transformer Engine checks of the GPU kit (``tools/gpu_check.py``); each needs TE and
reports "TE not installed" as a failed row without it. Not run yet: no lent GPU had TE.

1. ``te`` vs ``portable`` logits and gradients on the same weights (layout-invariant
   init, keyed by checkpoint name): sequential and parallel blocks, rotate-half and
   interleaved RoPE, GQA, sequences longer than the window.
2. ``rnope-train`` on ``te``: bf16, and FP8 linears (delayed; stopped at 5 and resumed),
   losses close to the bf16 run.
3. The refusal of FP8 attention on sliding layers: ``rnope-train --check`` on this GPU
   refuses ``train.fp8.attention=all`` on Hopper; TE itself has no backend for a windowed
   FP8 attention call on Hopper, runs the same call with our bf16 wrapper, and runs FP8
   attention on a global (no window) call.
4. The backend TE chose per layer in an FP8 ``global_only`` run
   (``NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2``: TE logs "Selected backend" once per layer per
   forward, as S and G layers alternate).
5. Document masking: ``te`` (THD ``PackedSeqParams``, TE's varlen attention with the
   window) vs ``portable`` (FlexAttention with a document-aware block mask) on one packed
   sequence with documents of 1, < W, = W and > W tokens, logits and gradients
   (:func:`check_te_document_mask`).

:data:`RUNS` lists every ``rnope-train`` run these checks make, with its expected outcome:
``gpu_check.py --dry-run`` validates them on CPU against :data:`DRY_RUN_GPU`.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
DRY_RUN_GPU = "h200"  # what the lent box has
TE_BF16 = ["train.backend=te", "train.precision=bf16"]
FP8_LINEARS = [*TE_BF16, "train.fp8.recipe=delayed", "train.fp8.attention=off"]
FP8_GLOBAL = [*TE_BF16, "train.fp8.recipe=delayed", "train.fp8.attention=global_only"]
# (label, overrides of recipes/tiny-cpu.yaml, None = must validate / a fragment of the refusal)
RUNS = [
    ("te bf16", TE_BF16, None),
    ("te fp8 linears", FP8_LINEARS, None),
    ("te fp8 global_only (backend per layer)", FP8_GLOBAL, None),
    ("te fp8 attention=all (refused on Hopper)", [*TE_BF16, "train.fp8.recipe=delayed", "train.fp8.attention=all"],
     "no TE backend runs FP8 attention with a sliding window below sm100"),
]


def te_installed() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a broken build that fails to load)
        return False
    return True


def _model_pair(cfg):
    """The same weights in a portable and a te model (bf16, on CUDA)."""
    from rnope_megatron import build_model
    from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor

    models = {}
    for backend in ("portable", "te"):
        model = build_model(cfg, cfg.to_transformer_config(params_dtype="bf16", backend=backend), backend=backend)
        fill_from_global(model, seeded_full_tensor(11))
        models[backend] = model.cuda()
    return models


def check_te_vs_portable(results):
    """te vs portable logits and gradients on the same weights (bf16; three model variants)."""
    import torch

    from rnope_megatron import ParallelLayout, RNoPEConfig
    from rnope_megatron.common.distributed import initialize_parallel, shutdown_parallel

    cases = {
        "sequential, rotate-half, GQA 8/2": dict(),
        "parallel block, LayerNorm, interleaved RoPE": dict(block="parallel", normalization="LayerNorm",
                                                          rotary_interleaved=True, norm_eps=1e-5),
        "sequential, MHA, window 255": dict(num_query_groups=8, window=255),
    }
    initialize_parallel(ParallelLayout())
    try:
        for name, overrides in cases.items():
            try:
                if not te_installed():
                    raise RuntimeError("TE not installed")
                cfg = RNoPEConfig(**{**dict(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=2,
                                            vocab_size=1024, max_seq_length=1024, window=128), **overrides})
                models = _model_pair(cfg)
                ids = torch.randint(0, 1024, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
                pos = torch.arange(1024, device="cuda").expand(2, -1)
                logits = {}
                for backend, model in models.items():
                    out = model(ids, pos, None)
                    out.float().pow(2).mean().backward()
                    logits[backend] = out.float()
                scale = logits["portable"].abs().max().item()
                err = (logits["te"] - logits["portable"]).abs().max().item() / scale
                grads = {b: dict(m.named_parameters()) for b, m in models.items()}
                common = [n for n in grads["te"] if n in grads["portable"] and grads["te"][n].grad is not None]
                grad_err = max(((grads["te"][n].grad.float() - grads["portable"][n].grad.float()).abs().max()
                                / grads["portable"][n].grad.float().abs().max().clamp(min=1e-12)).item()
                               for n in common)
                results.append((f"te vs portable logits ({name}), rel.", err, err < 3e-2))
                results.append((f"te vs portable grads, {len(common)} params ({name}), rel.", grad_err,
                                grad_err < 1e-1))
            except Exception as exc:  # noqa: BLE001  (every case reports)
                results.append((f"te vs portable ({name}): {type(exc).__name__}: {exc}"[:120], float("nan"), False))
    finally:
        shutdown_parallel()


def _train(run_dir, *overrides, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "rnope_megatron.train", str(RECIPE), "train.iters=10", "logging.interval=1",
           "checkpoint.interval=5", "logging.tensorboard=false", f"logging.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})


def _losses(proc, run_dir) -> dict:
    import json

    if proc.returncode:
        raise RuntimeError(f"rnope-train failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["iteration"]: m["loss"] for m in map(json.loads, lines)}


def check_te_trainer(results):
    """rnope-train on te: bf16, and FP8 linears stopped at 5 and resumed, vs the bf16 losses."""
    import math

    if not te_installed():
        results.append(("rnope-train te: TE not installed", float("nan"), False))
        return
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = fp8 = None
        try:
            bf16 = _losses(_train(f"{tmp}/bf16", *TE_BF16), f"{tmp}/bf16")
            results.append(("rnope-train te bf16, 10 iters, finite", float(len(bf16)),
                            len(bf16) == 10 and all(map(math.isfinite, bf16.values()))))
        except Exception as exc:  # noqa: BLE001
            results.append((f"rnope-train te bf16: {exc}"[:120], float("nan"), False))
        try:
            _losses(_train(f"{tmp}/fp8", *FP8_LINEARS, "train.stop_at=5"), f"{tmp}/fp8")
            fp8 = _losses(_train(f"{tmp}/fp8", *FP8_LINEARS), f"{tmp}/fp8")  # resumes at 5
            ok = sorted(fp8) == list(range(1, 11))
            err = max(abs(fp8[i] - bf16[i]) for i in bf16) if bf16 else float("nan")
            results.append(("rnope-train te fp8 linears (resumed at 5) vs te bf16 loss", err, ok and err < 0.15))
        except Exception as exc:  # noqa: BLE001
            results.append((f"rnope-train te fp8 linears: {exc}"[:120], float("nan"), False))


def check_fp8_attention_refusal(results):
    """Our refusal, and the TE behaviour it stands for."""
    import torch

    label, overrides, fragment = RUNS[-1]
    proc = subprocess.run([sys.executable, "-m", "rnope_megatron.train", "--check", str(RECIPE), *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    hopper = torch.cuda.get_device_capability()[0] == 9
    refused = proc.returncode != 0 and fragment in proc.stderr
    results.append((f"rnope-train --check refuses {label}", float(proc.returncode), refused == hopper))
    if not te_installed():
        results.append(("TE FP8 attention with a window: TE not installed", float("nan"), False))
        return
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    from rnope_megatron.attention.te_precision import bf16_autocast

    q, k, v = (torch.randn(1024, 2, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fp8_attention = DelayedScaling(fp8_dpa=True)

    def fp8_autocast():
        if hasattr(te, "autocast"):
            return te.autocast(enabled=True, recipe=fp8_attention)
        return te.fp8_autocast(enabled=True, fp8_recipe=fp8_attention)

    def call(window, wrapper=False):
        attention = te.DotProductAttention(8, 64, attn_mask_type="causal", window_size=window, qkv_format="sbhd")
        with fp8_autocast():
            if wrapper:
                with bf16_autocast():
                    return attention(q, k, v)
            return attention(q, k, v)

    for name, window, wrapper, should_run in [("windowed, FP8", (63, 0), False, not hopper),
                                              ("windowed, our bf16 wrapper", (63, 0), True, True),
                                              ("global, FP8", None, False, True)]:
        try:
            out = call(window, wrapper)
            ran, detail = bool(torch.isfinite(out).all()), "ran"
        except Exception as exc:  # noqa: BLE001  (TE: "No dot product attention backend is available")
            ran, detail = False, " ".join(str(exc).split())[:60]
        results.append((f"TE attention {name} under fp8_dpa: {detail}", float(ran), ran == should_run))


def check_backend_per_layer(results):
    """The attention backend TE chose per layer (NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2), fp8 global_only."""
    if not te_installed():
        results.append(("TE backend per layer: TE not installed", float("nan"), False))
        return
    from rnope_megatron.recipe import load_recipe

    layers = load_recipe(RECIPE).model.layer_pattern.layers
    with tempfile.TemporaryDirectory() as tmp:
        proc = _train(f"{tmp}/debug", *FP8_GLOBAL, "train.iters=1",
                      env={"NVTE_DEBUG": "1", "NVTE_DEBUG_LEVEL": "2"})
    selected = [line.split("Selected backend = ", 1)[1].strip()
                for line in (proc.stdout + proc.stderr).splitlines() if "Selected backend = " in line]
    for number, letter in enumerate(layers, start=1):
        chosen = selected[number - 1] if number <= len(selected) else "none logged"
        print(f"layer {number} ({letter}): {chosen}", flush=True)
    results.append((f"TE chose a backend for each of {len(layers)} layers (fp8 global_only; see log)",
                    float(len(selected)), proc.returncode == 0 and len(selected) >= len(layers)))


def check_te_document_mask(results):
    """te vs portable with document masking on the same weights (bf16): one packed
    sequence of 1024 tokens, documents of 1, 100, 128 (= W), 300 and 495 tokens."""
    import torch

    from rnope_megatron import ParallelLayout, RNoPEConfig
    from rnope_megatron.common.distributed import initialize_parallel, shutdown_parallel
    from rnope_megatron.model.build import run_model

    documents = [[0, 1, 101, 229, 529, 1024]]
    initialize_parallel(ParallelLayout())
    try:
        if not te_installed():
            raise RuntimeError("TE not installed")
        cfg = RNoPEConfig(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=2,
                          vocab_size=1024, max_seq_length=1024, window=128)
        models = _model_pair(cfg)
        ids = torch.randint(0, 1024, (1, 1024), generator=torch.Generator().manual_seed(0)).cuda()
        logits = {}
        for backend, model in models.items():
            out = run_model(model, ids, documents=documents)
            out.float().pow(2).mean().backward()
            logits[backend] = out.float()
        plain = run_model(models["portable"], ids).float()
        scale = logits["portable"].abs().max().item()
        err = (logits["te"] - logits["portable"]).abs().max().item() / scale
        masked_differs = (plain[:, 1:] - logits["portable"][:, 1:]).abs().max().item() / scale
        grads = {b: dict(m.named_parameters()) for b, m in models.items()}
        common = [n for n in grads["te"] if n in grads["portable"] and grads["te"][n].grad is not None]
        grad_err = max(((grads["te"][n].grad.float() - grads["portable"][n].grad.float()).abs().max()
                        / grads["portable"][n].grad.float().abs().max().clamp(min=1e-12)).item() for n in common)
        results.append(("document mask: te vs portable logits, rel.", err, err < 3e-2))
        results.append((f"document mask: te vs portable grads, {len(common)} params, rel.", grad_err, grad_err < 1e-1))
        results.append(("document mask changes the logits (vs no mask), rel.", masked_differs, masked_differs > 1e-2))
    except Exception as exc:  # noqa: BLE001  (the check reports)
        results.append((f"document mask te vs portable: {type(exc).__name__}: {exc}"[:120], float("nan"), False))
    finally:
        shutdown_parallel()


CHECKS = [check_te_vs_portable, check_te_trainer, check_fp8_attention_refusal, check_backend_per_layer,
          check_te_document_mask]


def dry_run(runs=RUNS, gpu: str = DRY_RUN_GPU) -> bool:
    """Validate each (label, overrides, expected refusal or None) run of ``runs`` as
    ``rnope-train --check --gpu`` would (no GPU, no TE); print one line per run. True when
    each ends as expected."""
    from rnope_megatron.common import gpus
    from rnope_megatron.model.precision import Platform, plan_precision
    from rnope_megatron.recipe import RecipeError, load_recipe
    from rnope_megatron.recipe.validation import validate

    all_ok = True
    for label, overrides, refusal in runs:
        try:
            recipe = load_recipe(RECIPE, overrides)
            validate(recipe, world_size=1)
            plan_precision(recipe, Platform(gpus.by_name(gpu)))
            outcome, ok = "recipe ok", refusal is None
        except RecipeError as err:
            outcome, ok = f"refused: {err}", refusal is not None and refusal in str(err)
        all_ok &= ok
        print(f"  {'ok ' if ok else 'BAD'} {label}: {outcome}", flush=True)
    return all_ok
