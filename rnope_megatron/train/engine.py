"""The training engine on Megatron-Core's own machinery.

Model chunks (one per virtual pipeline stage) wrapped in Megatron DDP; Megatron's
optimizer (distributed on GPU) and OptimizerParamScheduler; the pipeline schedule from
``get_forward_backward_func`` (no pipelining, 1F1B, or interleaved VPP); grads finalized
by ``finalize_model_grads`` (DP all-reduce, SP norm grads, tied embeddings). On a machine
without CUDA the CPU compat layer (switched on by ``initialize_parallel``) lets the same
code run under gloo.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from rnope_megatron.common.distributed import compute_device
from rnope_megatron.data.dataset import batch_for, sample_documents
from rnope_megatron.model.build import build_model, run_model
from rnope_megatron.model.flops import pack_training_flops, training_flops_per_token
from rnope_megatron.model.fusions import fusion_overrides
from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor
from rnope_megatron.model.precision import Platform, plan_precision


def _check_optimizer_format(distributed_optimizer: bool, optimizer_format: str) -> None:
    """Fail at start-up, not at the first resume: megatron-core 0.19 cannot load a
    fully_reshardable distributed-optimizer checkpoint into torch's Adam (no TE/Apex)."""
    from megatron.core.optimizer import distrib_optimizer

    if distributed_optimizer and optimizer_format == "fully_reshardable" and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise ValueError(
            "checkpoint.optimizer_format=fully_reshardable needs TE or Apex (FusedAdam) with the "
            "distributed optimizer: with torch's Adam megatron-core 0.19 cannot load it (KeyError 'step'). "
            "Use checkpoint.optimizer_format=dp_reshardable or optimizer.distributed=false")


@dataclasses.dataclass
class StepResult:
    """What one optimizer step produced (identical on every rank)."""

    loss: float
    tokens: int
    """Tokens the step processed (global batch x sequence length)."""
    flops: float
    """Model FLOPs the step did (document masking: each pack's attention per document)."""
    documents: int | None
    """Documents (pieces of documents at sample edges included) in the global batch, with
    document masking; None without."""
    grad_norm: float
    lr: float
    skipped: bool


class Engine:
    """Model, optimizer, scheduler and the step function for one rank, built from the
    recipe in named steps (config, chunks, DDP, optimizer, scheduler, schedule hooks)."""

    def __init__(self, recipe, dp_size: int):
        from megatron.core import parallel_state

        self.recipe = recipe
        self.dp_size = dp_size
        o = recipe.optimizer
        self.optimizer_is_distributed = torch.cuda.is_available() if o.distributed is None else o.distributed
        _check_optimizer_format(self.optimizer_is_distributed, recipe.checkpoint.optimizer_format)
        # Per-layer precision on this GPU (rnope-train refused impossible FP8 before launch).
        self.precision = plan_precision(recipe, Platform.detect() if recipe.train.fp8 else None)
        self.config = self._transformer_config()
        self.model = self._wrap_in_ddp(self._build_chunks())
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self._install_schedule_hooks()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        # Last-stage ranks of TP rank 0 report; CP ranks hold different tokens, all report.
        self.reports_loss = self.last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
        self.cp_group = parallel_state.get_context_parallel_group() if recipe.parallel.context > 1 else None
        # one rank per data-parallel replica counts its batch's FLOPs and documents
        self.counts_work = (parallel_state.get_tensor_model_parallel_rank() == 0
                            and parallel_state.get_pipeline_model_parallel_rank() == 0
                            and parallel_state.get_context_parallel_rank() == 0)

    def _transformer_config(self):
        t, layout = self.recipe.train, self.recipe.parallel
        overrides = {}
        if layout.virtual_pipeline:
            # As megatron.training does for the interleaved schedule: unbatched p2p with
            # overlap. Batched p2p posts sends to prev and next in one batch; with PP=2
            # both are the same peer, and gloo (CPU) then matches them out of order.
            overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        overrides.update(fusion_overrides(torch.cuda.is_available() if t.fusions is None else t.fusions, t.backend,
                                          self.recipe.model.rotary_interleaved))
        overrides.update(self.precision.transformer_config_fields())
        if t.recompute:
            overrides["recompute_granularity"] = t.recompute
            if t.recompute == "full":
                overrides.update(recompute_method="uniform", recompute_num_layers=1)
        return self.recipe.model.to_transformer_config(layout, params_dtype=t.precision, backend=t.backend,
                                                       **overrides)

    def _build_chunks(self) -> list:
        """This rank's model chunks (one per virtual pipeline stage)."""
        from megatron.core import parallel_state

        t, layout = self.recipe.train, self.recipe.parallel
        chunks = []
        for vp_stage in range(layout.virtual_pipeline) if layout.virtual_pipeline else [None]:
            chunk = build_model(
                self.recipe.model, self.config, backend=t.backend, vp_stage=vp_stage,
                bf16_attention_layers=self.precision.bf16_attention_layers(),
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            )
            if torch.cuda.is_available():
                chunk.cuda(torch.cuda.current_device())
            chunks.append(chunk)
        if t.layout_invariant_init:
            # Same weights whatever TP/PP/VPP: parallel runs are comparable with one process.
            fill_from_global(chunks, seeded_full_tensor(t.seed, self.recipe.model.init_method_std))
        return chunks

    def _wrap_in_ddp(self, chunks: list) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=self.recipe.train.precision != "fp32",
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.optimizer_is_distributed,
        )
        model = [
            DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)
        ]
        for chunk in model:
            chunk.broadcast_params()
        return model

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o, t = self.recipe.optimizer, self.recipe.train
        opt_config = OptimizerConfig(
            optimizer=o.name, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=t.precision == "bf16", fp16=t.precision == "fp16",
            params_dtype=self.config.params_dtype, use_distributed_optimizer=self.optimizer_is_distributed,
        )
        return get_megatron_optimizer(opt_config, self.model)

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, s, t = self.recipe.optimizer, self.recipe.scheduler, self.recipe.train
        decay_iters = s.decay_iters or t.iters
        samples = t.global_batch_size  # Megatron's scheduler counts samples
        wsd = s.decay_style == "WSD"
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=s.warmup_iters * samples,
            lr_decay_steps=decay_iters * samples, lr_decay_style=s.decay_style,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_iters * samples,
            wd_incr_style="constant",
            wsd_decay_steps=(s.wsd_decay_iters or decay_iters // 10) * samples if wsd else None,
            lr_wsd_decay_style="linear" if wsd else None,
            # The recipe wins over the values stored in a checkpoint (progress still
            # resumes): changing optimizer.lr or train.iters on resume takes effect.
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )

    def _install_schedule_hooks(self) -> None:
        """The hooks Megatron's pipeline schedules call (as megatron.training sets them)."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss

    # ------------------------------------------------------------------ stepping
    @property
    def num_microbatches(self) -> int:
        t = self.recipe.train
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    def _forward_step(self, data_iterator, model):
        batch = dict(next(data_iterator))
        # document masking: the whole sequence's boundaries, also under CP (not split)
        cu_seqlens = batch.pop("cu_seqlens", None)
        if self.cp_group is not None:
            # Megatron's load-balanced (2·CP chunks) split of the sequence; the RoPE
            # layers slice their frequencies the same way (attention.rotary.zigzag_rows).
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch, False, self.cp_group)
        documents = None if cu_seqlens is None else [sample_documents(row) for row in cu_seqlens.cpu()]
        output = run_model(model, batch["tokens"], batch["labels"], documents=documents)

        def loss_func(per_token_loss):
            mask = batch["loss_mask"].to(per_token_loss.device).float()
            loss_sum = (per_token_loss.float() * mask).sum()
            count = mask.sum()
            return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}

        return output, loss_func

    def _grads_finite(self) -> bool:
        """All ranks agree whether every (already reduced) gradient is finite."""
        bad = torch.zeros(1, device=compute_device())
        for chunk in self.model:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is not None and not torch.isfinite(grad).all():
                    bad += 1
                    break
        dist.all_reduce(bad)
        return bad.item() == 0

    def train_step(self, dataset, iteration: int) -> StepResult:
        """One optimizer step on the global batch of 0-based ``iteration``."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.recipe.train
        device = compute_device()
        micro = [batch_for(dataset, iteration, m, self.recipe.train, self.dp_rank, self.dp_size)
                 for m in range(self.num_microbatches)]
        # FLOPs and documents of this rank's batch, counted once per data-parallel rank
        work = torch.zeros(2, dtype=torch.float64, device=device)
        if self.counts_work:
            work += torch.tensor(self._batch_work(micro), dtype=torch.float64, device=device)
        micro = [{k: v.to(device) for k, v in batch.items()} for batch in micro]
        # a document-masked micro-batch runs as one packed row of micro_batch_size x seq_length
        packed = self.recipe.data.document_mask
        iterators = [iter(micro) for _ in self.model]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            # the shape pipeline stages exchange: [s, b, h] of the (packed) micro-batch
            seq_length=t.seq_length * t.micro_batch_size if packed else t.seq_length,
            micro_batch_size=1 if packed else t.micro_batch_size,
            forward_only=False,
        )
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        if self.reports_loss:
            for item in losses:
                totals[:2] += item["lm loss"].to(torch.float64)
        totals[2:] = work
        # every rank learns the global loss and work: reporters contribute, the rest zeros
        dist.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        # Megatron's fp32/bf16 optimizers apply the update whatever the grad norm, so a
        # non-finite loss or gradient is caught here, before the step.
        skipped = not math.isfinite(loss) or not self._grads_finite()
        grad_norm = float("nan")
        if not skipped:
            updated, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            skipped = not updated  # fp16 loss-scaler overflow
        if not skipped:
            self.scheduler.step(increment=t.global_batch_size)
        return StepResult(
            # tokens processed (what tok/s and TFLOP/s count), not the loss-masked count:
            # an answers-only retrieval mix trains a few tokens of a whole sequence
            loss=loss, tokens=t.global_batch_size * t.seq_length, flops=totals[2].item(),
            documents=int(totals[3].item()) if packed else None, grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"], skipped=skipped,
        )

    def _batch_work(self, micro: list[dict]) -> tuple[float, int]:
        """Training FLOPs and documents of micro-batches: with document masking each
        sample's attention is priced per document (what the kernels do), else every
        sample is one sequence."""
        m, t = self.recipe.model, self.recipe.train
        if "cu_seqlens" not in micro[0]:
            samples = len(micro) * t.micro_batch_size
            return samples * t.seq_length * training_flops_per_token(m, t.seq_length), 0
        flops, documents = 0.0, 0
        for batch in micro:
            for row in batch["cu_seqlens"]:
                bounds = sample_documents(row)
                lengths = [end - start for start, end in zip(bounds, bounds[1:])]
                flops += pack_training_flops(m, lengths)
                documents += len(lengths)
        return flops, documents
