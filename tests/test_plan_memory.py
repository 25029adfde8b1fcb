"""The planner's memory model against measured peak memory of the trainer's own engine
on CPU: tiny models built by rnope_megatron.train.engine.Engine (Megatron DDP, Megatron's
optimizer, the pipeline schedule), one warm-up step so Adam's state exists, then the peak
of a second fwd+bwd+optimizer step measured from the CPU allocator's own events (torch
profiler, profile_memory) on top of the live weights, grad buffers and optimizer state.

Observed when written (fp32, portable backend, 1 thread): -1.9 % (tiny-cpu), -2.6 %
(L=1024), -3.8 % (L=2048, one sequence), -3.5 % (vocab 8192), -3.3 % (parallel block,
LayerNorm): the model is a little low. Tolerance: 8 %. Recomputation cannot be measured
on CPU (Megatron's checkpointing saves the CUDA RNG state)."""

import pathlib

import pytest
import torch

from rnope_megatron.plan.measured import allocator_peak
from rnope_megatron.plan.memory import Setup, layer_params, stage_memory, stage_params
from rnope_megatron.recipe import load_recipe
from tests.trainer import RECIPE

TOLERANCE = 0.08


def _live_state_bytes(engine) -> int:
    """Weights, DDP buffers and optimizer state, each storage once."""
    seen, total = set(), 0
    tensors = [p for chunk in engine.model for p in chunk.parameters()]
    for chunk in engine.model:
        for buffer in chunk.buffers:
            tensors += [buffer.param_data, buffer.grad_data]
    for state in engine.optimizer.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def measure(tmp_path, overrides):
    """Peak bytes of a warm train step, in the session's one-process group (tests/conftest.py:
    ``megatron_single``; tearing it down here broke every later test that uses it)."""
    from torch.profiler import ProfilerActivity, profile

    from rnope_megatron.common.distributed import initialize_parallel
    from rnope_megatron.data.dataset import SampleShape, build_dataset
    from rnope_megatron.model.config import ParallelLayout
    from rnope_megatron.train.engine import Engine

    recipe = load_recipe(RECIPE, ["data.source=synthetic-retrieval", "train.layout_invariant_init=false",
                                  *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    initialize_parallel(recipe.parallel, seed=1)
    try:
        engine = Engine(recipe, 1)
        dataset = build_dataset(recipe.data, SampleShape.of(recipe), pathlib.Path(tmp_path), 2 * recipe.train.global_batch_size)
        engine.train_step(dataset, 0)  # Adam's state now exists
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            engine.train_step(dataset, 1)
        params = sum(p.numel() for chunk in engine.model for p in chunk.parameters())
        return recipe, _live_state_bytes(engine) + allocator_peak(profiler), params
    finally:
        initialize_parallel(ParallelLayout())  # the session's layout again (TP=PP=CP=1)
        torch.set_num_threads(threads)


CASES = {
    "tiny-cpu": [],
    "long sequence": ["train.seq_length=2048", "train.micro_batch_size=1", "train.global_batch_size=1"],
    "large vocabulary, parallel block": ["model.vocab_size=8192", "model.block=parallel",
                                         "model.normalization=LayerNorm"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_memory_model_matches_measured_peak_on_cpu(megatron_single, tmp_path, overrides):
    recipe, measured, params = measure(tmp_path, overrides)
    setup = Setup.of(recipe, data_parallel=1, on_gpu=False)
    assert stage_params(recipe.model, setup, 0) == params  # the parameter count is exact
    estimate = stage_memory(recipe, setup, 0)
    error = estimate.total / measured - 1
    print(f"memory model {estimate.total / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB: {error:+.1%}")
    assert abs(error) <= TOLERANCE, (estimate.components, measured)


def test_parameter_count_of_the_8b_and_111b_shapes():
    """Hand counts: the 8B (32 layers of 4096, GQA 8, ffn 14336, vocab 256000, tied) and
    Command A's 111B (64 layers of 12288, parallel block: one norm per layer)."""
    from rnope_megatron.model.config import RNoPEConfig

    paper = RNoPEConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=14336, vocab_size=256000, max_seq_length=8192, window=4096)
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert layer_params(paper, 1, "te") == per_layer
    command_a = RNoPEConfig(num_layers=64, hidden_size=12288, num_attention_heads=96, num_query_groups=8,
                            ffn_hidden_size=36864, vocab_size=256000, max_seq_length=8192, window=4096,
                            block="parallel", normalization="LayerNorm")
    per_layer = 12288 * (12288 + 2 * 1024) + 12288 * 12288 + 3 * 12288 * 36864
    assert layer_params(command_a, 1, "portable") == per_layer + 12288
    assert layer_params(command_a, 1, "te") == per_layer + 2 * 12288  # TE's LayerNorm has a (frozen) bias
    total = 64 * (per_layer + 12288) + 256000 * 12288 + 12288
    assert 110e9 < total < 112e9  # "111B"
