"""A quantized Hugging Face directory, through our converter's tables and modelopt's own
Hugging Face export (what serving stacks read: TensorRT-LLM, vLLM, SGLang).

1. The weights go through the target's mapping table (:mod:`rnope_megatron.convert`), as
   ``rnope-convert to-hf`` maps them, into the transformers class of the target
   (SmolLM3 or Cohere2), built from the same ``config.json`` the converter writes: the
   layer pattern (``layer_types``, ``sliding_window``, NoPE layers) is the converter's.
2. The HF linears get quantizers of the same format without calibration, and each takes
   the properties and calibrated tensors of the Megatron linear it came from, through the
   same table: per-output-row tensors (per-channel or block ``_amax``) are split like the
   weight rows (q/k/v of the grouped ``linear_qkv``, gate/up of ``linear_fc1``),
   per-tensor ones and the per-input-channel ``_pre_quant_scale`` are shared (q, k and v
   read the same input).
3. ``modelopt.torch.export.export_hf_checkpoint`` writes quantized weights, their scales,
   ``hf_quant_config.json`` and ``quantization_config`` in ``config.json``.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import torch

from rnope_megatron.common.output import staged_output
from rnope_megatron.convert.byte_tokenizer import write_byte_tokenizer
from rnope_megatron.convert.hf_dir import require_hf_extra
from rnope_megatron.convert.streaming import layer_groups, megatron_to_hf
from rnope_megatron.convert.targets import adapter_named
from rnope_megatron.data.tokenizers import make_tokenizer
from rnope_megatron.quantize.formats import FORMATS, modelopt_config, require_modelopt


def prepare(cfg, arch: str | None):
    """The target adapter; refuses a model it cannot represent (before any work)."""
    require_hf_extra()
    adapter = adapter_named(arch or ("cohere2" if cfg.block == "parallel" else "smollm3"))
    adapter.to_hf(cfg)
    return adapter


def split_like_rows(mapping, tensor: torch.Tensor, rows: int, shapes) -> tuple[torch.Tensor, ...]:
    """A quantizer tensor of a Megatron linear with ``rows`` output rows, as the mapping
    splits that linear's weight: per-row tensors (any number of values per row) follow
    the rows; anything else is shared by every target tensor."""
    arity = len(mapping.hf)
    if tensor.dim() == 0 or tensor.numel() % rows or tensor.shape[0] % rows or tensor.numel() == 1:
        return tuple(tensor.clone() for _ in range(arity))
    trailing = tensor.shape[1:]
    parts = mapping.to_hf(tensor.reshape(rows, -1), shapes)
    return tuple(part.reshape(-1, *trailing).clone() for part in parts)


def _linear_rows(model, mapping_rows):
    """(mapping, Megatron module, HF module names) of every quantized Megatron linear."""
    for mapping, name, hf_names in mapping_rows:
        if not name.endswith(".weight"):
            continue
        module = model.get_submodule(name[: -len(".weight")])
        if hasattr(module, "weight_quantizer"):
            yield mapping, module, [n[: -len(".weight")] for n in hf_names]


def _quantizer_tensors(module) -> dict[str, torch.Tensor]:
    """``<quantizer>.<buffer>`` -> tensor of a quantized linear's calibrated quantizer state."""
    return {k: v for k, v in module.state_dict().items()
            if "_quantizer." in k and not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


def _set_buffer(quantizer, attr: str, value: torch.Tensor) -> None:
    if attr in quantizer._buffers and quantizer._buffers[attr] is not None:
        quantizer._buffers[attr] = value.to(quantizer._buffers[attr].dtype)
    else:
        quantizer.register_buffer(attr, value)


def quantized_hf_model(model, cfg, adapter, fmt_config: dict, eod: int | None = None):
    """The transformers model holding ``model``'s weights and quantizers (see module
    docstring); ``eod``: the tokenizer's end-of-document id (eos and pad, as rnope-convert)."""
    import transformers

    mtq = require_modelopt()
    hf_cfg = adapter.to_hf(cfg)
    hf_cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if eod is not None and eod < cfg.vocab_size:
        hf_cfg.update(eos_token_id=eod, pad_token_id=eod)
    fields = {k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")}
    config = transformers.AutoConfig.for_model(hf_cfg["model_type"], **fields)
    config.architectures = hf_cfg["architectures"]
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    result = hf.load_state_dict(megatron_to_hf(adapter, cfg, weights), strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"converted weights do not fit {type(hf).__name__}: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    hf.eval()
    mtq.quantize(hf, dict(fmt_config, algorithm=None))  # quantizers only: they take ours below
    shapes = adapter.shapes(cfg)
    rows = [row for group in layer_groups(adapter.mappings(cfg), cfg.num_layers) for row in group]
    for mapping, module, hf_names in _linear_rows(model, rows):
        targets = [hf.get_submodule(n) for n in hf_names]
        for qname in ("weight_quantizer", "input_quantizer", "output_quantizer"):
            source = getattr(module, qname, None)
            if source is None:
                continue
            properties = {k: v for k, v in source.get_modelopt_state(properties_only=True).items()
                          if k not in SHAPE_PROPERTIES}
            for target in targets:
                getattr(target, qname).set_from_modelopt_state(properties, properties_only=True)
        rows_out = module.weight.shape[0]
        for key, tensor in _quantizer_tensors(module).items():
            qname, attr = key.rsplit(".", 1)
            for target, part in zip(targets, split_like_rows(mapping, tensor, rows_out, shapes)):
                _set_buffer(target.get_submodule(qname), attr, part)
        with torch.no_grad():
            for target in targets:  # a block quantizer lays out its blocks for this weight's shape
                if target.weight_quantizer.is_enabled and target.weight_quantizer.block_sizes:
                    target.weight_quantizer(target.weight)
    return hf


# Quantizer properties derived from the shape of the tensor a block quantizer saw (the
# fused Megatron weight): each HF weight derives its own on its first pass.
SHAPE_PROPERTIES = ("_original_shape", "_block_reshape_size", "_padding", "_slices", "_amax_shape_for_export")


def export(model, cfg, adapter, recipe: dict, hf_dir, inputs: list, force: bool) -> dict:
    """Write the quantized Hugging Face directory (staged, like rnope-convert's outputs)."""
    from modelopt.torch.export import export_hf_checkpoint

    fmt_name = (getattr(model, "_rnope_quantization", None) or {}).get("format")

    fmt_config = modelopt_config(FORMATS[fmt_name]) if fmt_name else _config_of(model)
    tokenizer = (recipe.get("data") or {}).get("tokenizer", "bytes")
    try:
        eod = make_tokenizer(tokenizer).eod
    except (OSError, ValueError):
        eod = None
    hf = quantized_hf_model(model, cfg, adapter, fmt_config, eod)
    with staged_output(hf_dir, inputs, force, {"command": "quantize --hf", "arch": adapter.model_type},
                       "rnope-quantize") as stage:
        # Unquantized tensors (embeddings, norms, the head) keep the model's float32.
        export_hf_checkpoint(hf, export_dir=stage)
        if tokenizer != "bytes" and pathlib.Path(tokenizer).is_file():
            shutil.copy(tokenizer, stage / "tokenizer.json")
        elif tokenizer == "bytes":  # as rnope-convert to-hf: readers tokenize as training did

            write_byte_tokenizer(stage)
        quant = json.loads((stage / "hf_quant_config.json").read_text())["quantization"]
    print(f"wrote {hf_dir} ({adapter.model_type}, quant_algo {quant.get('quant_algo')}, "
          f"excluded {quant.get('exclude_modules')})", flush=True)
    return {"dir": str(hf_dir), "arch": adapter.model_type, "quant_algo": quant.get("quant_algo")}


def _config_of(model) -> dict:
    """The quantize config recorded in the model's modelopt state (a checkpoint quantized
    without rnope-quantize's record)."""
    import modelopt.torch.opt as mto

    for mode, entry in mto.modelopt_state(model)["modelopt_state_dict"]:
        if mode == "quantize":
            return {"quant_cfg": entry["config"]["quant_cfg"]}
    raise ValueError("the model has no quantize mode in its modelopt state")
