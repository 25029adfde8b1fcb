"""The two conversions as functions on directories (what ``rnope-convert`` runs).

``to_hf``: a checkpoint rnope-train wrote (any TP/PP/VPP) -> a Hugging Face directory,
streamed a layer at a time into safetensors shards. ``from_hf``: a Hugging Face directory
-> a weights-only checkpoint plus ``model.yaml``. Both write through
:func:`rnope_megatron.convert.output.staged_output` (nothing lost, nothing half-written).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import yaml

from rnope_megatron.config import DTYPES, RNoPEConfig
from rnope_megatron.convert.targets import adapter_named, adapter_of
from rnope_megatron.convert.hf_dir import HFWeights, Progress, ShardedWriter, read_config, require_hf_extra
from rnope_megatron.convert.output import staged_output
from rnope_megatron.convert.retrofit import retrofit
from rnope_megatron.convert.streaming import convert, layer_groups, refuse_unused_hf_tensors

EXPORT_DTYPES = ("bf16", "fp32")


def _end_of_document(tokenizer: str):
    from rnope_megatron.data.tokenizers import make_tokenizer

    try:
        return make_tokenizer(tokenizer).eod
    except (OSError, ValueError):
        return None


def to_hf(ckpt: str, out: str, arch: str | None = None, dtype: str = "bf16", force: bool = False,
          shard_mb: int = 2000) -> dict:
    """Export a Megatron checkpoint as a Hugging Face directory (see module docstring)."""
    from rnope_megatron.checkpoint.layout import resolve, saved_recipe
    from rnope_megatron.checkpoint.reader import CheckpointReader
    from rnope_megatron.distributed import ensure_single_process

    require_hf_extra()
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    source = resolve(ckpt)
    recipe = saved_recipe(source)
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
        writer = ShardedWriter(stage, shard_mb * 2**20)

        def read(names):
            loaded = reader.load(names)
            for tensor in loaded.values():
                progress.add(tensor)
            return loaded

        for group in convert(adapter, cfg, read, "to_hf"):
            for name, tensor in group.items():
                writer.add(name, tensor.to(DTYPES[dtype]).contiguous())
            writer.flush_if_full()
        writer.close()
        hf_cfg["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
        eod = _end_of_document(tokenizer)
        if eod is not None and eod < cfg.vocab_size:
            hf_cfg.update(eos_token_id=eod, pad_token_id=eod, bos_token_id=None)
        (stage / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (stage / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
        if tokenizer != "bytes" and pathlib.Path(tokenizer).is_file():
            shutil.copy(tokenizer, stage / "tokenizer.json")
        elif tokenizer == "bytes":
            from rnope_megatron.convert.byte_tokenizer import write_byte_tokenizer

            write_byte_tokenizer(stage)
    print(f"wrote {out} ({adapter.model_type}, {len(writer.files)} shard(s), {writer.total / 2**20:,.1f} MiB)")
    return {"arch": adapter.model_type, "shards": len(writer.files), "bytes": writer.total}


def from_hf(hf_dir: str, out: str, force: bool = False, pattern: str | None = None,
            window: int | None = None) -> dict:
    """Import a Hugging Face directory as a weights-only checkpoint + ``model.yaml``;
    ``pattern`` / ``window`` retrofit it into another layer pattern (:mod:`.retrofit`)."""
    from rnope_megatron.checkpoint.weights_only import write_weights_checkpoint
    from rnope_megatron.distributed import ensure_single_process

    require_hf_extra()
    hf_path = pathlib.Path(hf_dir)
    hf = read_config(hf_path)
    adapter = adapter_of(hf)
    cfg, changes = retrofit(adapter.from_hf(hf), pattern, window)  # refusals come before any output
    weights = HFWeights(hf_path)
    refuse_unused_hf_tensors(adapter, cfg, weights.names())
    final_dir = pathlib.Path(out).resolve()
    with staged_output(out, [hf_path], force, {"command": "from-hf", "source": str(hf_path.resolve())}) as stage:
        state: dict = {}
        read = lambda names: {k: v.float() for k, v in weights.read(names).items()}  # noqa: E731
        for group in convert(adapter, cfg, read, "to_megatron"):
            state.update(group)
        recipe = {"model": dataclasses.asdict(cfg), "data": {"tokenizer": "bytes"}}
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
