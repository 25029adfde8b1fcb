"""A quantized Hugging Face export (``rnope-quantize --hf``) computed as a serving stack
computes it, for ``rnope-eval --hf``.

transformers has no quantizer for ``quant_method: modelopt``: ``from_pretrained`` builds
the class from ``config.json`` and loads the stored FP8 / integer weights as if they were
plain floats (scored as such, a campaign measured weights up to 416 where the model has
0.08 and logits 62% off, with exit status 0). Here each quantized linear gets its weight
dequantized from the stored values and scales, and its input multiplied by the stored
pre-quant scale and quantized with the stored input scale (the formats of
:mod:`rnope_megatron.quantize.formats` that run on CPU); any other algorithm is refused.
"""

from __future__ import annotations

import json
import pathlib

import torch

# hf_quant_config.json "quant_algo" -> our format name
ALGORITHMS = {"FP8": "fp8", "INT8_SQ": "int8_sq", "W4A16_AWQ": "int4_awq"}


def quant_algo(directory: pathlib.Path, hf_config: dict) -> str | None:
    """The export's quantization algorithm, or None for an unquantized directory."""
    marker = directory / "hf_quant_config.json"
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["quantization"]["quant_algo"] or "unknown"
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{marker}: not a modelopt quantization record") from None
    quant = hf_config.get("quantization_config")
    if quant:
        return str(quant.get("quant_algo") or quant.get("quant_method") or "unknown")
    return None


def format_of(directory: pathlib.Path, algo: str) -> str:
    fmt = ALGORITHMS.get(algo)
    if fmt is None:
        raise ValueError(f"{directory}: quantized with {algo}, which rnope-eval cannot compute on this machine "
                         f"(it computes {', '.join(ALGORITHMS)}): evaluate the quantized checkpoint with "
                         f"--checkpoint instead")
    return fmt


def _dequantized_weight(stored: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp8":  # per-tensor scale
        return stored.float() * scale.float()
    if fmt == "int8_sq":  # a scale per output channel
        return stored.float() * scale.float().reshape(-1, 1)
    # int4_awq: two rows per byte (low nibble: the even row), signed 4-bit, a scale per block
    low, high = (stored & 0x0F).to(torch.int8), (stored >> 4).to(torch.int8)
    rows = torch.stack([low, high], dim=1).reshape(-1, stored.shape[1])
    rows = torch.where(rows > 7, rows - 16, rows).float()
    return rows * scale.float().repeat_interleave(rows.shape[1] // scale.shape[1], dim=1)


def _quantize_inputs(fmt: str, pre: torch.Tensor | None, act: torch.Tensor | None):
    def hook(_module, args):
        x = args[0]
        if pre is not None:
            x = x * pre.float()
        if act is not None:
            s = act.float()
            if fmt == "fp8":
                x = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
            else:
                x = torch.round(x / s).clamp(-127, 127) * s
        return (x,) + args[1:]

    return hook


def load_dequantized(directory: pathlib.Path, fmt: str):
    """The transformers model of ``directory`` with every quantized linear computed from
    its stored values and scales. Returns (model, number of quantized linears)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    # int4's packed [rows/2, cols] weights differ in shape from the class's: replaced below
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                 ignore_mismatched_sizes=fmt == "int4_awq").eval()
    shards = sorted(directory.glob("*.safetensors"))
    names = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            names.update({name: shard for name in f.keys()})
    scaled = {name[:-len(".weight_scale")] for name in names if name.endswith(".weight_scale")}
    wanted = {name for name in names if name.rsplit(".", 1)[0] in scaled}  # weights, scales
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys() if name in wanted})
    count = 0
    for name, module in model.named_modules():
        scale = tensors.get(f"{name}.weight_scale")
        if scale is None:
            continue
        weight = _dequantized_weight(tensors[f"{name}.weight"], scale, fmt)
        if weight.shape != module.weight.shape:
            raise ValueError(f"{directory}: {name}.weight dequantizes to {list(weight.shape)}, "
                             f"config.json says {list(module.weight.shape)}")
        module.weight.data = weight
        module.register_forward_pre_hook(_quantize_inputs(fmt, tensors.get(f"{name}.pre_quant_scale"),
                                                          tensors.get(f"{name}.input_scale")))
        count += 1
    if count == 0:
        raise ValueError(f"{directory}: says it is quantized ({fmt}) but holds no weight scales")
    return model, count
