"""TP=2, PP=2 (and TP=2 with sequence parallelism) on 2 CPU processes under gloo give the
same loss, logits and gradients as one process; virtual-pipeline chunks build the right
layer kinds. Tolerance 1e-5 absolute (fp32; only reduction order differs)."""

import functools

import pytest
import torch

from tests.support import free_port, run_distributed
from tests.workers import built_layers, fails_on_rank_1, forward_backward

TOL = dict(atol=1e-5, rtol=0)
IDS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))


def assemble(results) -> dict:
    """Full gradient tensors from every rank's (global slice, values) shards."""
    full = {}
    for result in results:
        for key, shards in result["grads"].items():
            for index, values, shape in shards:
                target = full.setdefault(key, torch.full(shape, float("nan")))
                region = target[index]
                if not torch.isnan(region).all():  # a replica: must agree with the first copy
                    torch.testing.assert_close(region, values.reshape(region.shape), **TOL, msg=key)
                target[index] = values.reshape(region.shape)
    return full


@functools.cache
def single_process(model_items):
    return forward_backward(0, 1, free_port(), {}, dict(model_items), IDS)


def _compare(layout, model_kwargs, megatron_single):
    reference = single_process(tuple(sorted(model_kwargs.items())))
    results = run_distributed(forward_backward, 2, layout, model_kwargs, IDS)
    last = results[-1]
    torch.testing.assert_close(last["loss"], reference["loss"], **TOL)
    torch.testing.assert_close(last["logits"], reference["logits"], **TOL)
    ours, ref = assemble(results), assemble([reference])
    assert ours.keys() == ref.keys()
    for key in ref:
        assert not torch.isnan(ours[key]).any(), f"{key}: shards do not cover the tensor"
        torch.testing.assert_close(ours[key], ref[key], **TOL, msg=key)


@pytest.mark.parametrize(
    "layout, model_kwargs",
    [
        ({"tensor": 2}, {}),
        ({"tensor": 2, "sequence_parallel": True}, {}),
        ({"tensor": 2}, {"block": "parallel", "normalization": "LayerNorm", "rotary_interleaved": True}),
        ({"pipeline": 2}, {}),
        ({"pipeline": 2}, {"tie_embeddings": False, "num_layers": 8, "pattern": "SSSGSSSR"}),
    ],
    ids=["tp2", "tp2-sp", "tp2-parallel-block", "pp2-tied", "pp2-untied"],
)
def test_parallel_layout_matches_single_process(megatron_single, layout, model_kwargs):
    _compare(layout, model_kwargs, megatron_single)


def test_virtual_pipeline_chunks_build_the_right_layers():
    """12 layers, PP=2, VPP=2: chunks of 3, global layers at 4, 8, 12 (first, middle and
    last of their chunks). Layer numbers come from Megatron's TransformerLayer itself."""
    results = run_distributed(built_layers, 2, {"pipeline": 2, "virtual_pipeline": 2}, {"num_layers": 12})
    seen = {}
    for result in results:
        for vp, number, window, rope in result["layers"]:
            seen[number] = (result["pp_rank"], vp, window, rope)
    assert sorted(seen) == list(range(1, 13))
    for number, (pp_rank, vp, window, rope) in seen.items():
        chunk = (number - 1) // 3  # chunk order: (pp0,vp0), (pp1,vp0), (pp0,vp1), (pp1,vp1)
        assert (pp_rank, vp) == (chunk % 2, chunk // 2)
        is_global = number % 4 == 0
        assert window == (None if is_global else 8)
        assert rope == (not is_global)


def test_a_failing_rank_ends_its_pool_with_its_traceback_and_the_next_call_gets_a_new_one():
    """The rank pool (tests/support.py) neither hangs nor hides a rank's failure."""
    with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
        run_distributed(fails_on_rank_1, 2, timeout=120)
    results = run_distributed(built_layers, 2, {"pipeline": 2}, {"num_layers": 4})
    assert sorted(r["pp_rank"] for r in results) == [0, 1]
