"""Checks of a Hugging Face directory before ``rnope-convert from-hf`` builds anything.

A ``config.json`` is only a claim: ``hidden_size: 1000000`` would make the converter
allocate a model of terabytes before any weight is read. Here the claim is compared with
the tensors' shapes in the safetensors headers (read without loading a tensor), so a
wrong or hostile config ends in one line naming its field, with nothing allocated.
"""

from __future__ import annotations

from rnope_megatron.model.config import RNoPEConfig


def check_head_layout(hf: dict, source: str = "config.json") -> None:
    """Heads that cannot split the hidden size (without an explicit ``head_dim``) or
    key-value heads that cannot group the query heads."""
    def number(name):
        value = hf.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    heads, hidden, kv = number("num_attention_heads"), number("hidden_size"), number("num_key_value_heads")
    if heads and hidden and hf.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{source}: num_attention_heads={heads} does not divide hidden_size={hidden} "
                         "(and there is no head_dim)")
    if heads and kv and heads % kv:
        raise ValueError(f"{source}: num_key_value_heads={kv} does not divide num_attention_heads={heads}")


def expected_shape(name: str, cfg: RNoPEConfig) -> list[tuple[int, str]] | None:
    """(size, config field) per dimension of the Hugging Face tensor ``name`` (Llama
    layout, every target's), or None for a tensor whose shape is not derived here."""
    hidden = (cfg.hidden_size, "hidden_size")
    q_rows = (cfg.num_attention_heads * cfg.head_dim, "num_attention_heads x head_dim")
    kv_rows = (cfg.query_groups * cfg.head_dim, "num_key_value_heads x head_dim")
    ffn = (cfg.ffn_size, "intermediate_size")
    vocab = (cfg.vocab_size, "vocab_size")
    suffixes = {
        "embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
        "q_proj.weight": [q_rows, hidden], "k_proj.weight": [kv_rows, hidden], "v_proj.weight": [kv_rows, hidden],
        "o_proj.weight": [hidden, q_rows], "gate_proj.weight": [ffn, hidden], "up_proj.weight": [ffn, hidden],
        "down_proj.weight": [hidden, ffn],
    }
    for suffix, shape in suffixes.items():
        if name.endswith(suffix):
            return shape
    if name.endswith("norm.weight"):
        return [hidden]
    return None


def check_config_against_weights(cfg: RNoPEConfig, shapes: dict[str, list[int]], files: dict[str, str],
                                 source: str = "config.json") -> None:
    """Every tensor's header shape must be what ``config.json`` implies; the first
    mismatch names the field (``shapes``: name -> header shape, ``files``: name -> file)."""
    for name, shape in shapes.items():
        expected = expected_shape(name, cfg)
        if expected is None:
            continue
        sizes = [size for size, _ in expected]
        if list(shape) == sizes:
            continue
        if len(shape) != len(expected):
            raise ValueError(f"{files[name]}: tensor {name} has shape {list(shape)}, config.json implies {sizes}")
        field = next(field for (size, field), got in zip(expected, shape) if size != got)
        claimed = next(size for (size, f), got in zip(expected, shape) if size != got)
        raise ValueError(f"{source}: {field} = {claimed} does not match tensor {name} of shape {list(shape)} "
                         f"in {files[name]} (the config claims {sizes})")
