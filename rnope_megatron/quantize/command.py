"""What ``rnope-quantize`` runs: load, calibrate, measure, save (and export).

Output directory (written whole or not at all, like rnope-convert's)::

    OUT_DIR/latest, OUT_DIR/iter_0000000/   weights + quantizers (+ the source's recipe)
    OUT_DIR/quantization.json              format, calibration time, eval loss before/after

``rnope-train RECIPE checkpoint.load=OUT_DIR`` continues it as quantization-aware
training (fresh optimizer: the checkpoint holds none). ``--hf HF_DIR`` also writes a
quantized Hugging Face directory (:mod:`.hf_export`). An already quantized checkpoint
(e.g. after QAT) keeps its quantizers: no calibration, only the measurement and outputs.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import torch

from rnope_megatron.checkpoint import quantizer_state as state
from rnope_megatron.checkpoint.layout import common_state, resolve, save_state
from rnope_megatron.checkpoint.reader import load_model
from rnope_megatron.common.distributed import ensure_single_process
from rnope_megatron.common.output import check_output, staged_output
from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.quantize import calibration, formats, hf_export
from rnope_megatron.recipe import recipe_from_dict

TOOL = "rnope-quantize"


def _inputs_of(source: pathlib.Path) -> list:
    return [source.parent if (source.parent / "latest").is_file() else source]


def quantize(ckpt: str, out: str, format_name: str | None, calib_samples: int = 64,
             calib_seq_length: int | None = None, eval_samples: int = 16, hf_dir: str | None = None,
             arch: str | None = None, force: bool = False, progress_every: float = 5.0) -> dict:
    """Quantize the checkpoint at ``ckpt`` into ``out`` (see module docstring). Returns the
    report written to ``quantization.json``."""
    formats.require_modelopt()  # before any work: the missing extra is one line
    for name, value in (("--calib-samples", calib_samples), ("--eval-samples", eval_samples)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if calib_seq_length is not None and calib_seq_length < 1:  # 0 used to mean "the default" silently
        raise ValueError(f"--calib-seq-length must be >= 1 (tokens; omit it for the recipe's train.seq_length), "
                         f"got {calib_seq_length}")
    source = resolve(ckpt)
    common = common_state(source)
    if "recipe" not in common:
        raise ValueError(f"{source}: checkpoint has no recipe (not written by rnope-train / rnope-convert)")
    recipe = common["recipe"]
    cfg = RNoPEConfig.from_dict(recipe["model"])
    recorded = (common.get(state.QUANTIZATION) or {}).get("format")
    if state.MODELOPT_STATE in common:
        if format_name is not None and recorded is not None and format_name != recorded:
            raise ValueError(f"{source} is already quantized ({recorded}); drop --format or pass --format {recorded}")
        fmt = formats.format_named(format_name or recorded) if (format_name or recorded) else None
    else:
        if format_name is None:
            raise ValueError(f"--format is required (one of {', '.join(formats.FORMATS)})")
        fmt = formats.format_named(format_name)
    if fmt is not None:
        formats.check_device(fmt, torch.cuda.is_available())

    seq_length = calib_seq_length or recipe_from_dict(recipe).train.seq_length
    if seq_length > cfg.max_seq_length:
        raise ValueError(f"--calib-seq-length {seq_length} exceeds model.max_seq_length={cfg.max_seq_length}")
    calibration.check_memory(calib_samples, eval_samples, seq_length, recipe)
    adapter = None
    if hf_dir is not None:
        adapter = hf_export.prepare(cfg, arch)  # refuses what the target cannot hold, before any work
        check_output(hf_dir, _inputs_of(source), force, TOOL, others=[("OUT_DIR", out)], label="--hf")
    check_output(out, _inputs_of(source), force, TOOL, others=[("--hf", hf_dir)], label="OUT_DIR")

    ensure_single_process()
    cfg, model = load_model(source)  # restores the quantizers of an already quantized checkpoint
    already = state.is_quantized(model)
    with tempfile.TemporaryDirectory(prefix="rnope-quantize-data-") as scratch:
        cache = pathlib.Path((recipe.get("data") or {}).get("cache_dir") or scratch)
        batches = calibration.recipe_batches(recipe, calib_samples, eval_samples, calib_seq_length, cache)
    report = {
        "format": fmt.name if fmt else None, "modelopt_config": fmt.config if fmt else None,
        "source": str(source), "calib_samples": calib_samples, "calib_seq_length": batches.seq_length,
        "eval_samples": eval_samples,
    }
    if already:
        print(f"{source} is already quantized ({report['format'] or 'format not recorded'}): keeping its quantizers",
              flush=True)
        report.update(calibration_seconds=None, eval_loss_unquantized=None)
    else:
        report["eval_loss_unquantized"] = calibration.mean_loss(model, batches.evaluation)
        print(f"quantizing to {fmt.name} ({fmt.description}); calibrating on {calib_samples} samples of "
              f"{batches.seq_length} tokens", flush=True)
        report["calibration_seconds"] = calibrate(model, fmt, batches.calibration, progress_every)
    report["eval_loss_quantized"] = calibration.mean_loss(model, batches.evaluation)
    if report["eval_loss_unquantized"] is not None:
        report["eval_loss_delta"] = report["eval_loss_quantized"] - report["eval_loss_unquantized"]
    import modelopt

    report["modelopt_version"] = modelopt.__version__

    write_checkpoint(model, recipe, report, out, _inputs_of(source), force)
    print(describe(report), flush=True)
    print(f"wrote {out}: weights + quantizers; continue as quantization-aware training with "
          f"rnope-train RECIPE checkpoint.load={out}", flush=True)
    if hf_dir is not None:
        report["hf"] = hf_export.export(model, cfg, adapter, recipe, hf_dir, _inputs_of(source), force)
    return report


def calibrate(model, fmt, batches: list, progress_every: float = 5.0) -> float:
    """Quantize ``model`` in place to ``fmt``, calibrating on ``batches``; returns the
    calibration time in seconds."""
    mtq = formats.require_modelopt()
    started = time.monotonic()
    quantized = mtq.quantize(model, formats.modelopt_config(fmt),
                             forward_loop=calibration.calibration_loop(batches, progress_every))
    seconds = round(time.monotonic() - started, 3)
    if quantized is not model:
        raise RuntimeError("modelopt returned another model object than it was given")
    state.stacked_layer_keys(model)
    return seconds


def write_checkpoint(model, recipe: dict, report: dict, out, inputs: list, force: bool = False) -> None:
    """``out``: ``iter_0000000`` (weights, quantizers, the recipe, the report), ``latest`` and
    ``quantization.json``, staged (whole or not at all)."""
    model._rnope_quantization = report  # saved with the checkpoint; read by the HF export
    with staged_output(out, inputs, force, {"command": "quantize", "format": report.get("format")}, TOOL) as stage:
        save_state({"model": model.sharded_state_dict(), "recipe": recipe, **state.checkpoint_entries([model]),
                    state.QUANTIZATION: report}, stage, 0, keep=1)
        (stage / "quantization.json").write_text(json.dumps(report, indent=1) + "\n")


def describe(report: dict) -> str:
    """One line: format, calibration time, eval losses."""
    after = report["eval_loss_quantized"]
    if report.get("eval_loss_unquantized") is None:
        return f"{report['format']}: eval loss {after:.4f} (quantized)"
    before, delta = report["eval_loss_unquantized"], report["eval_loss_delta"]
    return (f"{report['format']}: calibrated in {report['calibration_seconds']:.1f} s; eval loss "
            f"{before:.4f} -> {after:.4f} ({delta:+.4f}) over {report['eval_samples']} samples")
