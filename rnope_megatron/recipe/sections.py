"""The recipe's sections as typed dataclasses: ``model`` (:class:`RNoPEConfig`, the model
layer's own config), ``parallel`` (:class:`ParallelLayout`), ``train`` (with ``fp8``),
``optimizer``, ``scheduler``, ``data``, ``checkpoint``, ``logging``, ``cluster``, ``eval``.

Reading YAML into them is :mod:`.loading`; the cross-field checks are :mod:`.validation`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Optional

from rnope_megatron.common.typed import ConfigError
from rnope_megatron.model.config import ParallelLayout, RNoPEConfig

# A recipe problem; the message names the field.
RecipeError = ConfigError

EVAL_TASKS = ("passkey", "niah")
"""What ``eval.tasks`` may name (prompt builders: :mod:`rnope_megatron.eval.tasks`)."""
RETRIEVAL_TASKS = ("passkey", "key_value")
"""What ``data.retrieval_tasks`` may name (cases: :mod:`rnope_megatron.data.corpora`)."""


@dataclasses.dataclass
class FP8Section:
    """``train.fp8``: FP8 through Transformer Engine (``train.backend: te``, ``train.precision:
    bf16``). Absent or ``null``: no FP8."""

    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """Scaling recipe (Megatron's ``fp8_recipe``). ``tensorwise``: per-tensor current scaling
    (no amax history; the default). ``delayed``: scales from an amax history (the whole
    block shares one autocast, so no bf16 first/last layers). ``blockwise``: 1x128/128x128
    blocks, linears only (no FP8 attention). ``mxfp8``: 32-element micro-blocks, Blackwell
    only."""
    format: Literal["hybrid", "e4m3"] = "hybrid"
    """FP8 formats (Megatron's ``fp8``): ``hybrid`` = E4M3 forward, E5M2 gradients;
    ``e4m3`` everywhere."""
    attention: Literal["auto", "off", "global_only", "all"] = "off"
    """FP8 dot-product attention, per layer. ``off`` (default: TE calls FP8 attention a
    beta feature; the linears are where FP8 pays most): bf16 attention everywhere.
    ``global_only``: FP8 attention on the global layers, bf16 on the sliding ones (refused
    where TE cannot run it on the global layers). ``all``: FP8 attention on every layer
    (refused where TE cannot, e.g. sliding layers on Hopper). ``auto``: FP8 attention on each
    layer where TE can run it on this GPU and recipe, bf16 elsewhere."""
    bf16_first_last_layers: int = 0
    """Layers at each end of the model kept entirely in bf16 (Megatron's
    ``first_last_layers_bf16`` with ``num_layers_at_start/end_in_bf16``). 0 = none. Not with
    ``recipe: delayed``."""



@dataclasses.dataclass
class TrainSection:
    """How long and on what batch shapes to train."""

    iters: int = 100
    """Optimizer steps to reach (a resumed run continues to this count)."""
    seq_length: int = 256
    """Tokens per sequence."""
    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    seed: int = 1234
    """Seed of weights, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter/activation dtype (bf16 on GPUs; fp32 on CPU)."""
    backend: Literal["portable", "te"] = "portable"
    """Attention backend (see rnope_megatron.model.specs)."""
    stop_at: Optional[int] = None
    """Save a checkpoint and stop at this iteration (a later run resumes; e.g. to fit a
    job time limit). None = run to ``iters``."""
    max_nan_skips: int = 0
    """Iterations with a NaN/Inf loss or grad norm that may be skipped before stopping."""
    recompute: Optional[Literal["selective", "full"]] = None
    """Megatron activation recomputation granularity."""
    fusions: Optional[bool] = None
    """Megatron's CUDA fusions (RoPE, SwiGLU, bias-dropout-add; weight-gradient
    accumulation with te). None = on when CUDA is available."""
    layout_invariant_init: bool = False
    """Initialise weights from full tensors keyed by name (identical for every TP/PP/VPP
    layout; costs a full-size tensor per weight on each rank: small models only)."""
    cpu_threads: Optional[int] = None
    """torch intra-op threads on CPU, pinned for the run and recorded with each checkpoint
    (resuming under another count stays correct but is no longer bit-identical).
    None = torch's default (the machine's cores)."""
    state_digest: bool = False
    """At the end, print a SHA-256 of every parameter and optimizer state (also in
    ``exit_status.json``), and put one in each metrics.jsonl record: runs with equal
    digests hold bit-identical states, and the first unequal record locates a divergence."""
    fp8: Optional[FP8Section] = None
    """FP8 through Transformer Engine (:class:`FP8Section`; the per-layer policy is
    :mod:`rnope_megatron.model.precision`):
    recipe, per-layer attention policy, bf16 first/last layers. None = no FP8."""


@dataclasses.dataclass
class OptimizerSection:
    """Megatron optimizer (Adam/SGD) settings."""

    name: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of decay."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    distributed: Optional[bool] = None
    """Megatron distributed optimizer (sharded states). None = on with CUDA, off on CPU."""


@dataclasses.dataclass
class SchedulerSection:
    """Megatron OptimizerParamScheduler."""

    warmup_iters: int = 10
    decay_style: Literal["cosine", "linear", "constant", "WSD", "inverse-square-root"] = "cosine"
    decay_iters: Optional[int] = None
    """Iterations over which the LR decays (None = train.iters)."""
    wsd_decay_iters: Optional[int] = None
    """WSD only: length of the final decay phase (None = 10% of the decay iterations)."""


@dataclasses.dataclass
class DataSection:
    """Where tokens come from."""

    source: Literal["default", "indexed", "synthetic-retrieval"] = "default"
    """default: embedded corpus (Python stdlib sources, bytes); indexed: Megatron .bin/.idx
    files from rnope-preprocess; synthetic-retrieval: passkey / key-value lookups only."""
    paths: list = dataclasses.field(default_factory=list)
    """Indexed dataset prefixes (without .bin/.idx), for source=indexed."""
    weights: Optional[list] = None
    """Blend weights, one per path (None = proportional to size)."""
    tokenizer: str = "bytes"
    """'bytes' (built-in byte-level, vocab 257) or a Hugging Face tokenizer.json path."""
    retrieval_fraction: float = 0.0
    """Share of samples drawn from the synthetic long-context retrieval mix (0..1)."""
    retrieval_tasks: list = dataclasses.field(default_factory=lambda: ["passkey", "key_value"])
    """The retrieval mix's cases, taken in turn: passkey (a 5-digit key in filler, what
    ``rnope-eval passkey`` asks) and key_value (8 pairs of 6 hex digits, one asked for)."""
    retrieval_loss: Literal["all", "answers"] = "all"
    """Which tokens of the retrieval mix are trained: all of them, or only the answers
    (haystack, needle and question are context: the answer is the one thing only
    retrieval predicts, and a loss on the rest drowns that signal in a small model)."""
    cache_dir: Optional[str] = None
    """Where built index caches and the default corpus go (default: <run dir>/data)."""
    document_mask: bool = False
    """Packed documents do not see each other: each token attends only to earlier tokens
    of its own document (on sliding layers, within the window too), RoPE positions restart
    at each document, and the prediction across a boundary (a document's end-of-document
    token predicting the next one's first token) is not trained. The boundaries are
    Megatron's own (``GPTDatasetConfig.inter_document_masking``); documents are what the
    indexed dataset holds (each ends with the tokenizer's EOD); the retrieval mix then
    packs two cases of half a sample each (when a half has room for a haystack). Under context
    parallelism a micro-batch is one packed sequence (``train.micro_batch_size: 1``)."""
    mean_document_length: Optional[int] = None
    """Tokens per document assumed by ``rnope-plan`` to price document-masked attention when
    the indexed dataset's document index cannot be read (None: read it, else price as
    without masking)."""


@dataclasses.dataclass
class CheckpointSection:
    """Megatron dist-checkpointing (torch_dist)."""

    dir: Optional[str] = None
    """Checkpoint directory (default: <run dir>/checkpoints)."""
    interval: int = 50
    """Save every this many iterations (and at the end, and on SIGTERM/SIGUSR1)."""
    keep: int = 2
    """Keep the newest K checkpoints."""
    load: Optional[str] = None
    """Initialise from this checkpoint directory (e.g. a pretraining stage) when the run's
    own checkpoint dir has none."""
    reset_optimizer: bool = False
    """With ``load``: take weights only (fresh optimizer, scheduler and iteration count)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """On-disk layout of the distributed optimizer's state (Megatron's
    ``distrib_optim_sharding_type``; the plain optimizer always reshards).
    ``dp_reshardable`` (Megatron's default) saves fully in parallel and resumes under any
    DP size but the same TP/PP. ``fully_reshardable`` resumes under any layout but gathers
    each DP group's state on one rank while saving, and in megatron-core 0.19 loads only
    with TE's or Apex's FusedAdam (torch's Adam fails with KeyError 'step')."""


@dataclasses.dataclass
class WandbSection:
    """``logging.wandb``: Weights & Biases beside TensorBoard, with the same scalars and the
    recipe as the run's config (needs the ``wandb`` extra). Absent or ``null``: off. Each
    start of the trainer (a resume too) is one W&B run; a run directory's runs share a group."""

    project: str = "rnope-megatron"
    """W&B project."""
    name: Optional[str] = None
    """Run name and group; None: the run directory's name."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """``offline`` writes the run under ``WANDB_DIR`` (default: the run directory) for a later
    ``wandb sync``; ``disabled`` logs nothing."""


@dataclasses.dataclass
class LoggingSection:
    """Console, metrics.jsonl, TensorBoard and (optionally) Weights & Biases."""

    run_dir: str = "runs/default"
    """Directory for metrics.jsonl, TensorBoard logs and (by default) checkpoints."""
    interval: int = 1
    """Log every this many iterations."""
    tensorboard: bool = True
    """Write TensorBoard events when the tensorboard package is installed."""
    peak_tflops: Optional[float] = None
    """Per-device peak (e.g. 989 for H100 bf16 dense) to print MFU; None prints TFLOP/s only."""
    wandb: Optional[WandbSection] = None
    """Weights & Biases (:class:`WandbSection`); None: off."""


@dataclasses.dataclass
class ClusterSection:
    """The machines a recipe was planned for (read by ``rnope-plan`` and the launch kit;
    the trainer itself takes its world size from torchrun)."""

    nodes: Optional[int] = None
    """Nodes the layout was planned for (None: not planned for a cluster)."""
    gpus_per_node: int = 8
    """GPUs per node."""
    gpu: str = "h100"
    """GPU model the layout must fit (a name in rnope_megatron.common.gpus: h100, h200, b200)."""


@dataclasses.dataclass
class EvalSection:
    """Retrieval gates on the training model (rnope_megatron.eval.gate): accuracy per
    length in metrics.jsonl and TensorBoard; the training trajectory is unchanged."""

    interval: int = 0
    """Evaluate every this many iterations (0 = never)."""
    tasks: list = dataclasses.field(default_factory=lambda: ["passkey"])
    """Any of ``passkey``, ``niah`` (see rnope_megatron.eval.tasks)."""
    lengths: list = dataclasses.field(default_factory=list)
    """Prompt lengths in tokens, e.g. [256, 1024, 4096] (empty = train.seq_length)."""
    depths: list = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Needle depths in [0, 1] (0 = start of the haystack, 1 = just before the question)."""
    samples: int = 4
    """Prompts per (length, depth) cell."""
    seed: int = 0
    """Seed of the prompts (their own generator: the data order is untouched)."""


@dataclasses.dataclass
class Recipe:
    """A whole training recipe."""

    model: RNoPEConfig = dataclasses.field(default_factory=RNoPEConfig)
    parallel: ParallelLayout = dataclasses.field(default_factory=ParallelLayout)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = dataclasses.field(default_factory=SchedulerSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    cluster: ClusterSection = dataclasses.field(default_factory=ClusterSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.logging.run_dir)

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return pathlib.Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


