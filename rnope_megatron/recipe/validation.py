"""Every cross-field check of a recipe, one validator per section, before any process
group exists. Each error is one line naming the fields involved."""

from __future__ import annotations

import math
import pathlib
import warnings
from typing import Optional

from rnope_megatron.attention.te_documents import te_thd_refusal
from rnope_megatron.common.gpus import by_name
from rnope_megatron.recipe.sections import EVAL_TASKS, RETRIEVAL_TASKS, Recipe, RecipeError


def data_parallel_size(recipe: Recipe, world_size: int) -> int:
    p = recipe.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise RecipeError(
            f"world size {world_size} is not divisible by parallel.tensor x pipeline x context "
            f"= {p.tensor} x {p.pipeline} x {p.context} = {model_parallel}"
            + (" (launch with torchrun --nproc-per-node ...)" if world_size == 1 else "")
        )
    return world_size // model_parallel


def _finite(path: str, value: float, low: float | None = None, positive: bool = False) -> None:
    if not math.isfinite(value):
        raise RecipeError(f"{path}={value} must be a finite number")
    if positive and value <= 0:
        raise RecipeError(f"{path}={value} must be > 0")
    if low is not None and value < low:
        raise RecipeError(f"{path}={value} must be >= {low}")


def validate_parallel(recipe: Recipe) -> None:
    m, p, t = recipe.model, recipe.parallel, recipe.train
    for name in ("tensor", "pipeline", "context"):
        if getattr(p, name) < 1:
            raise RecipeError(f"parallel.{name} must be >= 1")
    if p.virtual_pipeline is not None and (p.pipeline < 2 or p.virtual_pipeline < 2):
        raise RecipeError("parallel.virtual_pipeline needs parallel.pipeline >= 2 and a value >= 2")
    chunks = p.pipeline * (p.virtual_pipeline or 1)
    if m.num_layers % chunks:
        raise RecipeError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline x virtual_pipeline = {chunks}")
    if m.num_attention_heads % p.tensor:
        raise RecipeError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={p.tensor}")
    if m.query_groups % p.tensor and p.tensor % m.query_groups:
        raise RecipeError(f"model.num_query_groups={m.query_groups} and parallel.tensor={p.tensor}: one must divide the other")
    if m.vocab_size % p.tensor:
        raise RecipeError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor={p.tensor} "
                          "(pad the vocabulary, e.g. to a multiple of 128)")
    if m.ffn_size % p.tensor:
        raise RecipeError(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tensor={p.tensor}")
    if p.sequence_parallel and p.tensor == 1:
        raise RecipeError("parallel.sequence_parallel needs parallel.tensor > 1")
    if p.sequence_parallel and t.seq_length % p.tensor:
        raise RecipeError(f"train.seq_length={t.seq_length} is not divisible by parallel.tensor={p.tensor} (sequence parallel)")
    if p.context > 1 and t.seq_length % (2 * p.context):
        # Megatron's load-balanced split: 2 x CP equal chunks, two per rank
        raise RecipeError(f"train.seq_length={t.seq_length} must be divisible by 2 x parallel.context={2 * p.context}")
    validate_context_communication(recipe)
    if p.context > 1 and p.sequence_parallel and (t.seq_length // p.context) % p.tensor:
        raise RecipeError(f"train.seq_length / parallel.context = {t.seq_length // p.context} tokens per rank is not "
                          f"divisible by parallel.tensor={p.tensor} (sequence parallel)")


SLIDING_COMM = {"portable": ("halo",), "te": ("halo", "a2a", "all_gather")}
GLOBAL_COMM = {"portable": ("all_gather",), "te": ("p2p", "all_gather", "a2a")}


def validate_context_communication(recipe: Recipe) -> None:
    """The per-kind CP communication against what each backend offers and TE's rules:
    no p2p / a2a+p2p on a windowed layer inside TE (not offered for S), and a2a splits
    heads over the CP ranks (Q and KV heads per TP rank divisible by CP)."""
    p, m, backend = recipe.parallel, recipe.model, recipe.train.backend
    for field, allowed in (("context_comm_sliding", SLIDING_COMM), ("context_comm_global", GLOBAL_COMM)):
        value = getattr(p, field)
        if value is not None and value not in allowed[backend]:
            raise RecipeError(f"parallel.{field}={value!r} is not available on train.backend={backend} "
                              f"(choose from {list(allowed[backend])})")
    if p.context > 1 and "a2a" in (p.context_comm_sliding, p.context_comm_global):
        heads, groups = m.num_attention_heads // p.tensor, max(1, m.query_groups // p.tensor)
        if heads % p.context or groups % p.context:
            raise RecipeError(f"parallel.context_comm_*=a2a splits heads over CP ranks: {heads} query and {groups} "
                              f"KV heads per TP rank are not divisible by parallel.context={p.context}")


def validate_train(recipe: Recipe) -> None:
    m, t = recipe.model, recipe.train
    for name in ("iters", "seq_length", "micro_batch_size", "global_batch_size"):
        if getattr(t, name) < 1:
            raise RecipeError(f"train.{name} must be >= 1")
    if t.seq_length > m.max_seq_length:
        raise RecipeError(f"train.seq_length={t.seq_length} exceeds model.max_seq_length={m.max_seq_length}")
    if "S" in m.layer_pattern.layers and m.window >= t.seq_length:
        warnings.warn(f"model.window={m.window} >= train.seq_length={t.seq_length}: sliding layers see every token")
    if t.global_batch_size % t.micro_batch_size:
        raise RecipeError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.stop_at is not None and t.stop_at < 1:
        raise RecipeError(f"train.stop_at={t.stop_at} must be >= 1")
    if t.max_nan_skips < 0:
        raise RecipeError(f"train.max_nan_skips={t.max_nan_skips} must be >= 0")
    if t.cpu_threads is not None and t.cpu_threads < 1:
        raise RecipeError(f"train.cpu_threads={t.cpu_threads} must be >= 1")


def validate_optimizer(recipe: Recipe) -> None:
    o = recipe.optimizer
    _finite("optimizer.lr", o.lr, positive=True)
    _finite("optimizer.min_lr", o.min_lr, low=0.0)
    if o.lr < o.min_lr:
        raise RecipeError(f"optimizer.min_lr={o.min_lr} exceeds optimizer.lr={o.lr}")
    _finite("optimizer.weight_decay", o.weight_decay, low=0.0)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(o, name)
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise RecipeError(f"optimizer.{name}={value} must be within [0, 1)")
    _finite("optimizer.adam_eps", o.adam_eps, positive=True)
    _finite("optimizer.clip_grad", o.clip_grad, low=0.0)


def validate_scheduler(recipe: Recipe) -> None:
    s = recipe.scheduler
    if s.warmup_iters < 0:
        raise RecipeError(f"scheduler.warmup_iters={s.warmup_iters} must be >= 0")
    for name in ("decay_iters", "wsd_decay_iters"):
        value = getattr(s, name)
        if value is not None and value < 1:
            raise RecipeError(f"scheduler.{name}={value} must be >= 1")
    decay = s.decay_iters or recipe.train.iters
    if s.warmup_iters >= decay:
        raise RecipeError(f"scheduler.warmup_iters={s.warmup_iters} must be below the decay length "
                          f"(scheduler.decay_iters or train.iters = {decay})")


def validate_data(recipe: Recipe) -> None:
    d = recipe.data
    if d.source == "indexed" and not d.paths:
        raise RecipeError("data.paths is empty but data.source=indexed")
    if d.weights is not None:
        if len(d.weights) != len(d.paths):
            raise RecipeError(f"data.weights has {len(d.weights)} entries for {len(d.paths)} data.paths")
        for index, weight in enumerate(d.weights):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise RecipeError(f"data.weights[{index}]={weight!r} must be a finite number >= 0")
        if not sum(d.weights) > 0:
            raise RecipeError("data.weights must not all be 0")
    if not 0.0 <= d.retrieval_fraction <= 1.0:
        raise RecipeError(f"data.retrieval_fraction={d.retrieval_fraction} must be within [0, 1]")
    if not d.retrieval_tasks or any(task not in RETRIEVAL_TASKS for task in d.retrieval_tasks):
        raise RecipeError(f"data.retrieval_tasks={d.retrieval_tasks!r}: give one or more of {list(RETRIEVAL_TASKS)}")
    if d.mean_document_length is not None and (isinstance(d.mean_document_length, bool)
                                                or not isinstance(d.mean_document_length, int)
                                                or d.mean_document_length < 1):
        raise RecipeError(f"data.mean_document_length={d.mean_document_length!r} must be a whole number >= 1")
    if d.document_mask:
        validate_document_mask(recipe)
    if d.tokenizer == "bytes" and recipe.model.vocab_size < 257:
        raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} < 257 needed by data.tokenizer=bytes "
                          "(256 bytes + EOD)")


def validate_document_mask(recipe: Recipe) -> None:
    """``data.document_mask`` with the layout and backend: under context parallelism one
    packed sequence per micro-batch; on te, the combinations Transformer Engine runs with
    THD (packed) attention (the portable backend runs all of them)."""
    p, t, m = recipe.parallel, recipe.train, recipe.model
    if p.context > 1 and t.micro_batch_size != 1:
        raise RecipeError(f"train.micro_batch_size={t.micro_batch_size}: with data.document_mask under "
                          f"parallel.context={p.context} a micro-batch is one packed sequence (use 1)")
    if t.backend != "te":
        return
    if p.context > 1:
        # TE's THD attention under CP expects each document cut into 2·CP shares (documents
        # padded to a multiple of 2·CP); the trainer keeps the sequence-level zig-zag our
        # halo exchange is built on, which only the portable backend attends over correctly.
        raise RecipeError(f"data.document_mask with parallel.context={p.context} runs on train.backend=portable "
                          f"(the halo exchange with documents); on te it would need Megatron's per-document "
                          f"context-parallel split (documents padded to 2 x parallel.context), not implemented")
    # Without CP (refused above with it): FP8 attention, and the windowed THD kernels TE
    # needs (versions unknown here are checked again when the run starts).
    fp8_attention = t.fp8 is not None and t.fp8.attention != "off"
    for sliding in sorted({m.layer_pattern.kind(n).sliding for n in range(1, m.num_layers + 1)}):
        reason = te_thd_refusal(sliding=sliding, fp8_attention=fp8_attention)
        if reason:
            where = "train.fp8.attention" if fp8_attention else "model.window"
            raise RecipeError(f"data.document_mask on train.backend=te, {where}: {reason}")


def validate_input_files(recipe: Recipe) -> None:
    """The files a run reads exist (checked by the trainer at start, not when a recipe is
    merely loaded: a login node may not see the cluster's data)."""
    d = recipe.data
    if d.source == "indexed":
        for index, prefix in enumerate(d.paths):
            for suffix in (".bin", ".idx"):
                if not pathlib.Path(f"{prefix}{suffix}").is_file():
                    raise RecipeError(f"data.paths[{index}]: {prefix}{suffix} does not exist (make it with rnope-preprocess)")
    if d.tokenizer != "bytes" and not pathlib.Path(d.tokenizer).is_file():
        raise RecipeError(f"data.tokenizer: {d.tokenizer} does not exist (a tokenizer.json path, or 'bytes')")


def validate_checkpoint(recipe: Recipe) -> None:
    c = recipe.checkpoint
    if c.interval < 1 or c.keep < 1:
        raise RecipeError("checkpoint.interval and checkpoint.keep must be >= 1")
    if c.reset_optimizer and not c.load:
        raise RecipeError("checkpoint.reset_optimizer=true needs checkpoint.load (the weights to start from)")


def validate_logging(recipe: Recipe) -> None:
    if recipe.logging.interval < 1:
        raise RecipeError("logging.interval must be >= 1")
    peak = recipe.logging.peak_tflops
    if peak is not None:
        _finite("logging.peak_tflops", peak, positive=True)
    if recipe.logging.wandb is not None:
        validate_wandb(recipe.logging.wandb)


# W&B refuses project names with these characters (and names over 128 characters).
_WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def validate_wandb(w) -> None:
    if not w.project.strip():
        raise RecipeError("logging.wandb.project must not be empty")
    bad = sorted(set(w.project) & set(_WANDB_PROJECT_FORBIDDEN))
    if bad:
        raise RecipeError(f"logging.wandb.project={w.project!r} must not contain {' '.join(bad)}")
    if len(w.project) > 128:
        raise RecipeError(f"logging.wandb.project is {len(w.project)} characters long (W&B takes at most 128)")
    if w.name is not None and not w.name.strip():
        raise RecipeError("logging.wandb.name must not be empty (leave it out for the run directory's name)")


def validate_cluster(recipe: Recipe) -> None:
    c = recipe.cluster
    if c.nodes is not None and c.nodes < 1:
        raise RecipeError(f"cluster.nodes={c.nodes} must be >= 1")
    if c.gpus_per_node < 1:
        raise RecipeError(f"cluster.gpus_per_node={c.gpus_per_node} must be >= 1")
    by_name(c.gpu, "cluster.gpu")


def validate_eval(recipe: Recipe) -> None:
    e, p = recipe.eval, recipe.parallel
    if e.interval < 0:
        raise RecipeError(f"eval.interval={e.interval} must be >= 0 (0 = no evaluation)")
    if not e.interval:
        return
    if not e.tasks or any(t not in EVAL_TASKS for t in e.tasks):
        raise RecipeError(f"eval.tasks={e.tasks} must be a non-empty list of {list(EVAL_TASKS)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in e.lengths):
        raise RecipeError(f"eval.lengths={e.lengths} must be positive integers (tokens)")
    if not e.depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
                           for d in e.depths):
        raise RecipeError(f"eval.depths={e.depths} must be a non-empty list of numbers in [0, 1]")
    if e.samples < 1:
        raise RecipeError(f"eval.samples={e.samples} must be >= 1")
    if p.pipeline > 1 or p.context > 1:
        raise RecipeError("eval.interval > 0 needs parallel.pipeline=1 and parallel.context=1 (the gate runs one "
                          "plain forward of the whole model); evaluate checkpoints with rnope-eval instead")


def validate_world(recipe: Recipe, world_size: int) -> None:
    """The checks that need the number of processes."""
    p, t = recipe.parallel, recipe.train
    dp = data_parallel_size(recipe, world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise RecipeError(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
                          f"data-parallel size = {t.micro_batch_size} x {dp}")
    if p.pipeline > 1 and p.virtual_pipeline and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pipeline:
        raise RecipeError("interleaved pipeline: micro-batches per step must be a multiple of parallel.pipeline")


def _gemm_multiples(recipe) -> None:
    """TE quantizes GEMM inputs only when the rows (tokens per rank) are a multiple of 8
    and the columns of 16 (MXFP8: both of 32, its block); fail here, not at the first step."""
    m, p, t, fp8 = recipe.model, recipe.parallel, recipe.train, recipe.train.fp8
    rows, cols = (32, 32) if fp8.recipe == "mxfp8" else (8, 16)
    tokens = t.seq_length * t.micro_batch_size // p.context // (p.tensor if p.sequence_parallel else 1)
    if tokens % rows:
        raise RecipeError(f"train.fp8.recipe={fp8.recipe}: {tokens} tokens per micro-batch per rank "
                          f"(train.seq_length x micro_batch_size / parallel sizes) is not a multiple of {rows}")
    widths = {"model.hidden_size": m.hidden_size, "model.ffn_hidden_size / parallel.tensor": m.ffn_size // p.tensor,
              "attention width (heads x head dim) / parallel.tensor": m.num_attention_heads * m.head_dim // p.tensor}
    for name, width in widths.items():
        if width % cols:
            raise RecipeError(f"train.fp8.recipe={fp8.recipe}: {name} = {width} is not a multiple of {cols} "
                              "(TE's FP8 GEMMs)")


def validate_fp8(recipe) -> None:
    """``train.fp8``: the checks that need no GPU (what the GPU and TE can run is
    :func:`rnope_megatron.model.precision.plan_precision`, at launch or ``--check``)."""
    fp8, t, m = recipe.train.fp8, recipe.train, recipe.model
    if fp8 is None:
        return
    if t.backend != "te":
        raise RecipeError(f"train.fp8: FP8 runs through Transformer Engine: needs train.backend=te "
                          f"(got {t.backend})")
    if t.precision != "bf16":
        raise RecipeError(f"train.fp8: needs train.precision=bf16 (got {t.precision})")
    n = fp8.bf16_first_last_layers
    if n < 0:
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n} must be >= 0")
    if n and fp8.recipe == "delayed":
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n}: not available with train.fp8.recipe=delayed "
                          "(its amax reduction spans the whole block; Megatron refuses it)")
    per_stage = m.num_layers // recipe.parallel.pipeline
    if n > per_stage:
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n} exceeds the layers per pipeline stage ({per_stage})")
    if 2 * n >= m.num_layers:
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n} leaves no FP8 layer of model.num_layers={m.num_layers}")
    _gemm_multiples(recipe)



SECTION_VALIDATORS = (validate_parallel, validate_train, validate_fp8, validate_optimizer, validate_scheduler,
                      validate_data, validate_checkpoint, validate_logging, validate_cluster, validate_eval)


def validate(recipe: Recipe, world_size: Optional[int] = None) -> None:
    """Cross-field checks; each error names the fields involved."""
    for validator in SECTION_VALIDATORS:
        validator(recipe)
    if world_size is not None:
        validate_world(recipe, world_size)
