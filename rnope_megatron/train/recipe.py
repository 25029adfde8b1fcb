"""Training recipes: YAML -> typed dataclasses, command-line overrides, validation.

A recipe has the sections ``model`` (:class:`RNoPEConfig`), ``parallel``
(:class:`ParallelLayout`), ``train``, ``optimizer``, ``scheduler``, ``data``,
``checkpoint``, ``logging``, ``cluster`` and ``eval``. Unknown keys are errors naming their path; ``a.b=value``
arguments override values; ``base: other.yaml`` inherits from another recipe, which may
have a base of its own (a chain such as 128k -> 64k -> ... -> pretrain-8k; a cycle is an
error naming the chain); a section given as a file name (``model: models/paper-8b.yaml``) is
read from that file, relative to the recipe naming it. :func:`validate` (in
:mod:`.validation`) checks every cross-field constraint before any process group exists,
so a bad recipe fails in a second, not after the job is scheduled.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any, Literal, Optional, get_type_hints

import yaml

from rnope_megatron import safe_yaml
from rnope_megatron.config import ParallelLayout, RNoPEConfig  # noqa: F401  (type hints)
from rnope_megatron.precision import FP8Section  # noqa: F401  (type hints)
from rnope_megatron.typed import ConfigError, build_dataclass


# A recipe problem; the message names the field.
RecipeError = ConfigError


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
    """Attention backend (see rnope_megatron.specs)."""
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
    """FP8 through Transformer Engine (see :class:`rnope_megatron.precision.FP8Section`):
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
class LoggingSection:
    """Console, metrics.jsonl and TensorBoard."""

    run_dir: str = "runs/default"
    """Directory for metrics.jsonl, TensorBoard logs and (by default) checkpoints."""
    interval: int = 1
    """Log every this many iterations."""
    tensorboard: bool = True
    """Write TensorBoard events when the tensorboard package is installed."""
    peak_tflops: Optional[float] = None
    """Per-device peak (e.g. 989 for H100 bf16 dense) to print MFU; None prints TFLOP/s only."""


@dataclasses.dataclass
class ClusterSection:
    """The machines a recipe was planned for (read by ``rnope-plan`` and the launch kit;
    the trainer itself takes its world size from torchrun)."""

    nodes: Optional[int] = None
    """Nodes the layout was planned for (None: not planned for a cluster)."""
    gpus_per_node: int = 8
    """GPUs per node."""
    gpu: str = "h100"
    """GPU model the layout must fit (a name in rnope_megatron.gpus: h100, h200, b200)."""


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


# --------------------------------------------------------------------------- loading

def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_scalar(dotted: str, text: str) -> Any:
    if text == "":
        return ""
    try:
        return safe_yaml.load(text, f"override {dotted}")
    except safe_yaml.YAMLTooLarge as err:
        raise RecipeError(str(err)) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {dotted}: {text!r} is not a YAML value ({' '.join(str(err).split())})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            if node.get(key) is None:  # absent, or a null section (train.fp8: null) being switched on
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise RecipeError(f"override {dotted}: {key} is not a section")
        node[keys[-1]] = _parse_scalar(dotted, text)
    return raw


def _read_mapping(path: pathlib.Path, what: str) -> dict:
    """A YAML file holding a mapping (an empty file is an empty mapping)."""
    if not path.is_file():
        raise RecipeError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        raw = safe_yaml.load(text, str(path))
    except safe_yaml.YAMLTooLarge as err:
        raise RecipeError(str(err)) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of keys, got a {type(raw).__name__}")
    return raw


def _section_files(raw: dict, folder: pathlib.Path) -> dict:
    """Replace sections given as file names by the mappings in those files."""
    return {key: _read_mapping(folder / value, f"section {key!r} file") if isinstance(value, str) and key != "base"
            else value for key, value in raw.items()}


def read_yaml(path, _chain: tuple = ()) -> dict:
    """The raw recipe mapping: the file, its section files and its bases merged (a base
    is read relative to the file naming it; the file's own keys win)."""
    path = pathlib.Path(path)
    chain = _chain + (path,)
    what = f"{_chain[-1]}: base recipe" if _chain else "recipe file"
    raw = _section_files(_read_mapping(path, what), path.parent)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base must be one recipe file name, got {base!r}")
    base_path = path.parent / base
    if any(base_path.resolve() == seen.resolve() for seen in chain):
        names = " -> ".join(str(p) for p in chain + (base_path,))
        raise RecipeError(f"{path}: base chain is a cycle ({names})")
    return _merge(read_yaml(base_path, chain), raw)


def recipe_from_dict(raw: dict) -> Recipe:
    sections = {f.name: f.type for f in dataclasses.fields(Recipe)}
    hints = get_type_hints(Recipe)
    for key in raw:
        if key not in sections:
            raise RecipeError(f"unknown section {key!r} (known: {', '.join(sections)})")
    built = {}
    for name in sections:
        built[name] = build_dataclass(hints[name], raw.get(name) or {}, name)
    return Recipe(**built)


def load_recipe(path, overrides: list[str] = ()) -> Recipe:
    """Read, inherit, override, type-check and validate a recipe (no process groups)."""
    from rnope_megatron.train.validation import validate

    recipe = recipe_from_dict(apply_overrides(read_yaml(path), list(overrides)))
    validate(recipe)
    return recipe
