"""Model configuration: one dataclass that describes an RNoPE-SWA model and produces the
Megatron-Core ``TransformerConfig`` for it."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from rnope_megatron.common import safe_yaml
from rnope_megatron.common.typed import build_dataclass
from rnope_megatron.model.pattern import LayerKind, LayerPattern

Backend = Literal["portable", "te"]
# Names of the dtypes recipes and tools accept (train.precision, rnope-convert --dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class ParallelLayout:
    """How the model is split. Sizes are Megatron's; the product with the data-parallel
    size is the world size."""

    tensor: int = 1
    """Tensor-parallel size (heads and MLP columns split across ranks)."""
    pipeline: int = 1
    """Pipeline-parallel size (layers split across stages)."""
    virtual_pipeline: Optional[int] = None
    """Model chunks per pipeline rank (interleaved schedule); None = not interleaved."""
    context: int = 1
    """Context-parallel size: each sequence is split over this many ranks (Megatron's
    load-balanced chunks); attention brings in what each rank's queries can see."""
    context_comm_sliding: Optional[str] = None
    """How sliding-window layers communicate under CP: ``halo`` (default: each chunk gets
    only the W-1 keys before it, point to point; both backends), or TE's own ``a2a`` /
    ``all_gather`` (te backend only)."""
    context_comm_global: Optional[str] = None
    """How global layers communicate under CP: ``all_gather`` of K/V (the portable
    backend's only choice and its default), or TE's ``p2p`` (ring; te default), ``a2a``,
    ``all_gather``."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms/dropout (requires tensor > 1)."""


@dataclasses.dataclass
class RNoPEConfig:
    """Architecture of an RNoPE-SWA model (or one of the paper's baselines).

    Defaults are a tiny CPU-sized model; real scales come from recipes."""

    num_layers: int = 4
    """Transformer layers in the whole model (all pipeline stages)."""
    hidden_size: int = 64
    """Model width d_model."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA). None = num_attention_heads (plain multi-head attention)."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner width. None = 4 * hidden_size."""
    kv_channels: Optional[int] = None
    """Head dimension. None = hidden_size // num_attention_heads."""
    vocab_size: int = 256
    """Vocabulary size; must be divisible by the tensor-parallel size (pad it, e.g. to 128k)."""
    max_seq_length: int = 256
    """Longest sequence the model is built for; can grow between stages (no RoPE rescale)."""

    pattern: str = "SSSG"
    """Layer pattern, see :mod:`rnope_megatron.model.pattern` (S = window+RoPE, G = global NoPE,
    R = global RoPE). A block repeated to num_layers, or one letter per layer."""
    window: int = 64
    """Sliding window in Hugging Face semantics: W keys including the current token."""
    rope_theta: float = 10000.0
    """RoPE base of the sliding (S) layers. The paper found 10k best inside the hybrid."""
    global_rope_theta: Optional[float] = None
    """RoPE base of global RoPE (R) layers. None = rope_theta."""
    rotary_interleaved: bool = False
    """True: rotate pairs (0,1),(2,3).. (Cohere2). False: rotate halves (Llama/SmolLM3)."""
    qk_norm_local: bool = False
    """QK-norm on the sliding layers (the paper removed QK-norm from the hybrid)."""
    qk_norm_global: bool = False
    """QK-norm on the global layers."""

    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """RMSNorm (SmolLM3/Llama) or LayerNorm without bias (Cohere2)."""
    norm_eps: float = 1e-6
    """Epsilon of every norm."""
    block: Literal["sequential", "parallel"] = "sequential"
    """sequential: x + attn(LN1 x), then + mlp(LN2 ·). parallel (Cohere): one LN shared,
    x + attn(LN x) + mlp(LN x)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    logit_scale: float = 1.0
    """Multiplier on the output logits (Cohere2's logit_scale)."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    output_init_std: Optional[float] = None
    """Std of the residual branches' output projections (attention out, MLP fc2). None:
    Megatron's default, ``init_method_std / sqrt(2 * num_layers)``. Tiny models may need
    the unscaled value: with the scaled one a 4-layer d=128 model did not learn passkey
    retrieval in 800 steps where the unscaled one learned it in 400 (docs/evaluation.md,
    "The paper's claim, small")."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (portable backend supports 0 only)."""

    def __post_init__(self):
        positive = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        groups = self.query_groups
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"model.normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.output_init_std is not None and not (isinstance(self.output_init_std, (int, float))
                                                     and self.output_init_std > 0):
            raise ValueError(f"model.output_init_std must be a positive number or null, got {self.output_init_std!r}")
        if self.block not in ("sequential", "parallel"):
            raise ValueError(f"model.block must be 'sequential' or 'parallel', got {self.block!r}")
        if self.rope_theta <= 0 or (self.global_rope_theta is not None and self.global_rope_theta <= 0):
            raise ValueError("model.rope_theta and model.global_rope_theta must be > 0")
        try:  # validates pattern and window; warns once on window >= max_seq_length
            LayerPattern.build(self.pattern, self.num_layers, self.window, self.max_seq_length)
        except ValueError as err:
            raise ValueError(f"model.pattern/window: {err}") from None

    @classmethod
    def from_dict(cls, values: dict, where: str = "model") -> "RNoPEConfig":
        """Build from a mapping (e.g. a YAML ``model:`` section); unknown keys and wrong
        types are errors naming their path (``model.hiden_size``)."""
        return build_dataclass(cls, values, where)

    @classmethod
    def from_yaml(cls, path) -> "RNoPEConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(safe_yaml.load(f.read(), str(path)) or {})

    # ---- derived values ----
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def layer_pattern(self) -> LayerPattern:
        return LayerPattern.build(self.pattern, self.num_layers, self.window)

    def rope_theta_for(self, kind: LayerKind) -> Optional[float]:
        """RoPE base for a layer kind, or None for NoPE layers."""
        if not kind.rope:
            return None
        if kind.sliding or self.global_rope_theta is None:
            return self.rope_theta
        return self.global_rope_theta

    def qk_norm_for(self, kind: LayerKind) -> bool:
        return self.qk_norm_local if kind.sliding else self.qk_norm_global

    def to_transformer_config(
        self,
        parallel: ParallelLayout | None = None,
        params_dtype: str = "fp32",
        backend: Backend = "portable",
        **overrides,
    ):
        """Megatron-Core ``TransformerConfig`` for this model on ``backend``'s attention.

        ``overrides`` go straight to TransformerConfig (e.g. fp8 settings, recompute,
        cp_comm_type); they win over the values derived here."""
        from megatron.core.transformer import TransformerConfig

        parallel = parallel or ParallelLayout()
        pattern = self.layer_pattern
        if params_dtype not in DTYPES:
            raise ValueError(f"params_dtype must be one of {sorted(DTYPES)}, got {params_dtype!r}")
        dtype = DTYPES[params_dtype]
        on_gpu = torch.cuda.is_available()
        values = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            kv_channels=self.head_dim,
            ffn_hidden_size=self.ffn_size,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            **self._output_init(),
            # The pattern in Megatron's own per-layer vocabulary, for TE's wrappers.
            **pattern.megatron_fields(),
            rotary_interleaved=self.rotary_interleaved,
            qk_layernorm=self.qk_norm_local or self.qk_norm_global,
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context,
            sequence_parallel=parallel.sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype is torch.bfloat16,
            fp16=dtype is torch.float16,
            # CPU runs build weights on the host; on GPU Megatron initialises on device.
            use_cpu_initialization=not on_gpu,
            # Fusions need CUDA kernels (apex/TE); enable them on GPU through overrides.
            apply_rope_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
        )
        if parallel.context > 1:
            values["cp_comm_type"] = self.cp_comm_types(parallel, backend)
        values.update(overrides)
        return TransformerConfig(**values)

    def _output_init(self) -> dict:
        if self.output_init_std is None:
            return {}
        from megatron.core.utils import init_method_normal

        return {"output_layer_init_method": init_method_normal(self.output_init_std)}

    def cp_comm_types(self, parallel: ParallelLayout, backend: str = "te") -> list[str]:
        """Per-layer context-parallel communication (Megatron's ``cp_comm_type`` list):
        ``halo`` for sliding layers unless ``parallel.context_comm_sliding`` says otherwise
        (their halo exchange is ours, TE's attention then runs without CP), global layers
        ``p2p`` on te (ring attention, overlaps communication with compute) and
        ``all_gather`` on the portable backend."""
        sliding = parallel.context_comm_sliding or "halo"
        default_global = "p2p" if backend == "te" else "all_gather"
        global_ = parallel.context_comm_global or default_global
        return [sliding if kind == "S" else global_ for kind in self.layer_pattern.layers]
