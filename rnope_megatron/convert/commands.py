"""The two conversions as functions on directories (what ``rnope-convert`` runs).

``to_hf``: a checkpoint rnope-train wrote (any TP/PP/VPP) -> a Hugging Face directory,
streamed a layer at a time into safetensors shards. ``from_hf``: a Hugging Face directory
-> a weights-only checkpoint plus ``model.yaml``. Both write through
:func:`rnope_megatron.common.output.staged_output` (nothing lost, nothing half-written) and
check what they can before any work (output paths, a quantized source, a config.json
against its safetensors headers).

Precision: ``from_hf`` records the Hugging Face weights' dtype as the checkpoint's
``train.precision``; ``to_hf`` exports in the checkpoint's own precision (the recipe's
``train.precision``: what it was trained or imported in) unless ``--dtype`` says
otherwise, so an fp32 model imported and exported again is bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import yaml

from rnope_megatron.checkpoint.layout import common_state, resolve, saved_recipe
from rnope_megatron.checkpoint.quantizer_state import MODELOPT_STATE, QUANTIZATION
from rnope_megatron.checkpoint.reader import CheckpointReader
from rnope_megatron.checkpoint.weights_only import write_weights_checkpoint
from rnope_megatron.common import faults
from rnope_megatron.common.distributed import ensure_single_process
from rnope_megatron.common.output import check_output, staged_output
from rnope_megatron.convert.byte_tokenizer import write_byte_tokenizer
from rnope_megatron.convert.hf_dir import HFWeights, Progress, ShardedWriter, read_config, require_hf_extra
from rnope_megatron.convert.preflight import check_config_against_weights, check_head_layout
from rnope_megatron.convert.retrofit import retrofit
from rnope_megatron.convert.streaming import convert, layer_groups, refuse_unused_hf_tensors
from rnope_megatron.convert.targets import adapter_named, adapter_of
from rnope_megatron.data.tokenizers import make_tokenizer
from rnope_megatron.model.config import DTYPES, RNoPEConfig

EXPORT_DTYPES = ("bf16", "fp32", "fp16")
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def checkpoint_precision(recipe: dict) -> str:
    """The precision a checkpoint was trained or imported in (the recipe's default, fp32,
    when it does not say)."""
    precision = (recipe.get("train") or {}).get("precision") or "fp32"
    return precision if precision in EXPORT_DTYPES else "fp32"


def refuse_quantized(source, common: dict) -> None:
    """A quantized checkpoint's weights are not what it computes: its export is rnope-quantize's."""
    if MODELOPT_STATE in common:
        fmt = (common.get(QUANTIZATION) or {}).get("format") or "format not recorded"
        raise ValueError(f"{source} is a quantized checkpoint ({fmt}): rnope-convert exports unquantized weights "
                         f"only; export it with its quantizers by rnope-quantize {source} OUT_DIR --hf HF_DIR")


def _end_of_document(tokenizer: str):
    try:
        return make_tokenizer(tokenizer).eod
    except (OSError, ValueError):
        return None


def to_hf(ckpt: str, out: str, arch: str | None = None, dtype: str | None = None, force: bool = False,
          shard_mb: int = 2000) -> dict:
    """Export a Megatron checkpoint as a Hugging Face directory (see module docstring);
    ``dtype`` None: the checkpoint's own precision."""
    require_hf_extra()
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if isinstance(shard_mb, bool) or not isinstance(shard_mb, int) or shard_mb < 1:
        raise ValueError(f"--shard-mb must be >= 1 (MiB per safetensors shard), got {shard_mb}")
    source = resolve(ckpt)
    recipe = saved_recipe(source)
    refuse_quantized(source, common_state(source))
    check_output(out, [source.parent if (source.parent / "latest").is_file() else source], force)
    if dtype is None:
        dtype = checkpoint_precision(recipe)
        print(f"exporting in {dtype}, the checkpoint's precision (--dtype to choose another)", flush=True)
    cfg = RNoPEConfig.from_dict(recipe["model"])
    adapter = adapter_named(arch or ("cohere2" if cfg.block == "parallel" else "smollm3"))
    hf_cfg = adapter.to_hf(cfg)  # refuses what the target cannot represent, before any work
    ensure_single_process()
    reader = CheckpointReader(source, cfg)
    total = sum(len(group) for group in layer_groups(adapter.mappings(cfg), cfg.num_layers))
    progress = Progress(total)
    tokenizer = (recipe.get("data") or {}).get("tokenizer", "bytes")
    inputs = [source.parent if (source.parent / "latest").is_file() else source]
    with staged_output(out, inputs, force, {"command": "to-hf", "source": str(source), "arch": adapter.model_type}) \
            as stage:
        writer = ShardedWriter(stage, shard_mb * 2**20, final_dir=pathlib.Path(out))

        def read(names):
            loaded = reader.load(names)
            for tensor in loaded.values():
                progress.add(tensor)
            return loaded

        for index, group in enumerate(convert(adapter, cfg, read, "to_hf"), start=1):
            for name, tensor in group.items():
                writer.add(name, tensor.to(DTYPES[dtype]).contiguous())
            writer.flush_if_full()
            faults.point("mid_output", index)
        writer.close()
        hf_cfg["dtype"] = HF_DTYPE_NAMES[dtype]
        eod = _end_of_document(tokenizer)
        if eod is not None and eod < cfg.vocab_size:
            hf_cfg.update(eos_token_id=eod, pad_token_id=eod, bos_token_id=None)
        (stage / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (stage / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
        if tokenizer != "bytes" and pathlib.Path(tokenizer).is_file():
            shutil.copy(tokenizer, stage / "tokenizer.json")
        elif tokenizer == "bytes":
            write_byte_tokenizer(stage)
    print(f"wrote {out} ({adapter.model_type}, {len(writer.files)} shard(s), {writer.total / 2**20:,.1f} MiB)")
    return {"arch": adapter.model_type, "shards": len(writer.files), "bytes": writer.total}


def from_hf(hf_dir: str, out: str, force: bool = False, pattern: str | None = None,
            window: int | None = None) -> dict:
    """Import a Hugging Face directory as a weights-only checkpoint + ``model.yaml``;
    ``pattern`` / ``window`` retrofit it into another layer pattern (:mod:`.retrofit`)."""
    require_hf_extra()
    hf_path = pathlib.Path(hf_dir)
    check_output(out, [hf_path], force)
    hf = read_config(hf_path)
    check_head_layout(hf, str(hf_path / "config.json"))
    adapter = adapter_of(hf)
    cfg, changes = retrofit(adapter.from_hf(hf), pattern, window)  # refusals come before any output
    weights = HFWeights(hf_path)
    # before anything is allocated: the config's sizes are the tensors' sizes
    check_config_against_weights(cfg, weights.shapes(), {k: str(hf_path / v) for k, v in weights.file_of.items()},
                                 str(hf_path / "config.json"))
    refuse_unused_hf_tensors(adapter, cfg, weights.names())
    precision = _precision_of(hf, weights)
    final_dir = pathlib.Path(out).resolve()
    with staged_output(out, [hf_path], force, {"command": "from-hf", "source": str(hf_path.resolve())}) as stage:
        state: dict = {}
        read = lambda names: {k: v.float() for k, v in weights.read(names).items()}  # noqa: E731
        for index, group in enumerate(convert(adapter, cfg, read, "to_megatron"), start=1):
            state.update(group)
            faults.point("mid_output", index)
        recipe = {"model": dataclasses.asdict(cfg), "data": {"tokenizer": "bytes"}, "train": {"precision": precision}}
        if (hf_path / "tokenizer.json").is_file():
            shutil.copy(hf_path / "tokenizer.json", stage / "tokenizer.json")
            recipe["data"]["tokenizer"] = str(final_dir / "tokenizer.json")  # where it will be
        ensure_single_process()
        write_weights_checkpoint(cfg, state, stage, recipe)
        (stage / "model.yaml").write_text(yaml.safe_dump({"model": recipe["model"]}, sort_keys=False))
    for line in changes:
        print(line)
    print(f"wrote {out}: weights-only checkpoint + model.yaml ({adapter.model_type}, pattern {cfg.pattern}); "
          f"continue with checkpoint.load={out} checkpoint.reset_optimizer=true")
    return {"arch": adapter.model_type, "pattern": cfg.pattern}


def _precision_of(hf: dict, weights: HFWeights) -> str:
    """The Hugging Face model's precision: its config's ``dtype`` (``torch_dtype`` before
    transformers 5), else its embedding's stored dtype."""
    by_name = {name: key for key, name in HF_DTYPE_NAMES.items()}
    declared = hf.get("dtype") or hf.get("torch_dtype")
    if declared in by_name:
        return by_name[declared]
    stored = {"BF16": "bf16", "F32": "fp32", "F16": "fp16"}
    return stored.get(weights.dtype("model.embed_tokens.weight"), "fp32")
