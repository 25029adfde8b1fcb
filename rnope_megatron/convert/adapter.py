"""What a Hugging Face target is to the converter, and the registry of targets.

A target is one module (``smollm3.py``, ``cohere2.py``) holding one :class:`HFAdapter`
subclass: its config mapping both ways (with the refusals of what it cannot express) and
its table of typed weight mappings, registered with ``@register``. :mod:`.targets` loads
them; the CLI, the streaming driver and the tests find targets there. Adding a target is
one new file (and its name in ``targets.TARGETS``).

Layer letters: sliding + RoPE = S, full + NoPE = G, full + RoPE = R.
"""

from __future__ import annotations

from typing import ClassVar

from rnope_megatron.convert.mappings import QKV, Direct, GatedMLP, Mapping, Shapes
from rnope_megatron.model.config import RNoPEConfig

ADAPTERS: dict[str, "HFAdapter"] = {}
"""Registered targets by ``model_type`` (filled as :mod:`.targets` imports them)."""


def register(cls):
    """Class decorator: make a target known by its ``model_type``."""
    ADAPTERS[cls.model_type] = cls()
    return cls


class HFConfig:
    """Typed reads of a ``config.json`` dict: a field of the wrong type is a ValueError
    naming it, not a traceback from deep inside the conversion."""

    def __init__(self, values: dict, source: str = "config.json"):
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        self.values, self.source = values, source

    def get(self, name: str, kind: type, default=...):
        value = self.values.get(name, default)
        if value is ...:
            raise ValueError(f"{self.source}: field {name!r} is missing")
        if value is None and default is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{self.source}: field {name!r} must be {kind.__name__}, got {value!r}")
        return value

    def positive(self, name: str, default=...) -> int:
        value = self.get(name, int, default)
        if value is not None and value < 1:
            raise ValueError(f"{self.source}: field {name!r} must be >= 1, got {value}")
        return value

    def per_layer_list(self, name: str, length: int, default=None) -> list | None:
        value = self.values.get(name, default)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != length:
            raise ValueError(f"{self.source}: field {name!r} must be a list of {length} entries, got {value!r}")
        return value

    def rope_theta(self) -> float:
        # transformers 5.x writes rope_parameters: {rope_theta, rope_type}; older: rope_theta
        params = self.values.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{self.source}: field 'rope_parameters' must be an object, got {params!r}")
        theta = params.get("rope_theta", self.values.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{self.source} has no rope_theta (neither top-level nor in rope_parameters)")
        # transformers 4.x kept the scaling apart, in rope_scaling: {rope_type|type, factor..}
        legacy = self.values.get("rope_scaling") or {}
        for field, scaling in (("rope_parameters.rope_type", params), ("rope_scaling.rope_type", legacy)):
            if not isinstance(scaling, dict):
                raise ValueError(f"{self.source}: field {field.split('.')[0]!r} must be an object, got {scaling!r}")
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind != "default":
                # llama3 / yarn / linear rescale frequencies per band; our RoPE has one base
                raise ValueError(f"{self.source}: field {field} is {kind!r}: RoPE scaling {kind!r} cannot be "
                                 "represented (our RoPE has one base and no frequency rescaling)")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ValueError(f"{self.source}: rope_theta must be a positive number, got {theta!r}")
        return float(theta)


def letters(types: list, rope: list) -> str:
    """The pattern of per-layer (layer type, has RoPE)."""
    out = []
    for index, (kind, has_rope) in enumerate(zip(types, rope)):
        if kind == "sliding_attention":
            if not has_rope:
                raise ValueError(f"layer {index}: a sliding-window NoPE layer has no letter in the pattern")
            out.append("S")
        elif kind == "full_attention":
            out.append("R" if has_rope else "G")
        else:
            raise ValueError(f"config.json: layer_types[{index}] is {kind!r}, not sliding_attention/full_attention")
    return "".join(out)


class HFAdapter:
    """One Hugging Face target. Subclasses set the class attributes and implement
    :meth:`config_from_hf`, :meth:`config_to_hf` and :meth:`block_mappings`."""

    model_type: ClassVar[str]
    """transformers' ``model_type`` (also the ``--arch`` name)."""
    architecture: ClassVar[str]
    """The ``*ForCausalLM`` class transformers loads."""
    rope_interleaved: ClassVar[bool]
    """Interleaved RoPE pairs (0,1),(2,3).. (True) or halves (i, i+d/2) (False)."""
    qk_norm: ClassVar[bool] = False
    """The target has per-head q/k norms (its ``config_to_hf`` checks which layers)."""

    def config_from_hf(self, hf: HFConfig) -> RNoPEConfig:
        raise NotImplementedError

    def config_to_hf(self, cfg: RNoPEConfig) -> dict:
        raise NotImplementedError

    def block_mappings(self) -> list[Mapping]:
        """The target's per-layer rows beyond :data:`ATTENTION_AND_MLP` (its norms)."""
        raise NotImplementedError

    # ---- shared by every target ----
    def from_hf(self, hf: dict) -> RNoPEConfig:
        """RNoPEConfig of a ``config.json`` dict."""
        return self.config_from_hf(HFConfig(hf))

    def to_hf(self, cfg: RNoPEConfig) -> dict:
        """``config.json`` dict for ``cfg``; refuses what the target cannot represent."""
        if not self.qk_norm and (cfg.qk_norm_local or cfg.qk_norm_global):
            raise ValueError(f"{self.model_type} has no QK-norm; this model uses it")
        pattern = cfg.layer_pattern
        thetas = {cfg.rope_theta_for(pattern.kind(n)) for n in range(1, cfg.num_layers + 1)} - {None}
        if len(thetas) > 1:
            raise ValueError(f"{self.model_type} has one RoPE theta; this model uses {sorted(thetas)}")
        theta = thetas.pop() if thetas else cfg.rope_theta  # the base of the layers that rotate
        common = dict(
            num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.query_groups,
            intermediate_size=cfg.ffn_size, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_length, tie_word_embeddings=cfg.tie_embeddings,
            layer_types=pattern.hf_layer_types(), sliding_window=cfg.window,
            rope_parameters={"rope_theta": theta, "rope_type": "default"},
            hidden_act="silu", attention_bias=False, attention_dropout=0.0,
            model_type=self.model_type, architectures=[self.architecture],
        )
        return dict(common, **self.config_to_hf(cfg))

    def common_fields(self, hf: HFConfig) -> dict:
        """RNoPEConfig fields every target reads the same way."""
        heads = hf.positive("num_attention_heads")
        hidden = hf.positive("hidden_size")
        return dict(
            num_layers=hf.positive("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=hf.positive("num_key_value_heads", None) or heads,
            ffn_hidden_size=hf.positive("intermediate_size"),
            kv_channels=hf.positive("head_dim", None) or hidden // heads,
            vocab_size=hf.positive("vocab_size"), rope_theta=hf.rope_theta(),
            tie_embeddings=hf.get("tie_word_embeddings", bool, True),
        )

    def mappings(self, cfg: RNoPEConfig) -> list[Mapping]:
        """The full table for ``cfg`` (the untied output head only when untied)."""
        return ENDS + ATTENTION_AND_MLP + self.block_mappings() + ([] if cfg.tie_embeddings else [UNTIED_HEAD])

    def shapes(self, cfg: RNoPEConfig) -> Shapes:
        return Shapes.of(cfg, cfg.rotary_interleaved, self.rope_interleaved)


# Rows every Llama-layout target shares (HF names of the model.layers.{i} modules).
ENDS = [
    Direct("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Direct("decoder.final_layernorm.weight", ("model.norm.weight",)),
]
ATTENTION_AND_MLP = [
    QKV("decoder.layers.{i}.self_attention.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight")),
    Direct("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    GatedMLP("decoder.layers.{i}.mlp.linear_fc1.weight",
             ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")),
    Direct("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
    Direct("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
]
UNTIED_HEAD = Direct("output_layer.weight", ("lm_head.weight",))
