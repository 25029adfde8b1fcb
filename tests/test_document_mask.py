"""Document masking against "the documents run one at a time" and a dense float64
reference with an explicit same-document mask (the oracles).

A packed sequence holds documents of lengths 1, < W, = W, > W (long enough for the
pure-torch path's body tiles) and a last document cut by the sequence end. Kernels run on
both CPU paths (``cpu_kernel`` fixture from test_sliding_window: the other path raises);
the model runs sequential and parallel blocks with S, G and R layers.
Tolerance: 1e-5 absolute in fp32 (the issue's bound; measured ~1e-7), 1e-6 in fp64
against the dense reference (torch's CPU flash exp, see test_sliding_window)."""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from rnope_megatron.attention.core import packed_cu_seqlens
from rnope_megatron.attention.sliding_window import (
    causal_attention,
    document_attention,
    document_mask,
    document_mask_mod,
    sliding_window_attention,
)
from rnope_megatron.model.build import (
    build_model,
    crossing_predictions,
    document_positions,
    pack_documents,
    run_model,
)
from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor
from tests.support import tiny_config
from tests.test_sliding_window import cpu_kernel  # noqa: F401  (fixture)

WINDOW = 8
# 1, < W, = W, > W with body tiles (tile 4, prefix 8), 1 again, and a last document that
# the sequence end cuts (it continues past the pack in the corpus).
LENGTHS = [1, 5, 8, 21, 1, 11]
TOL = dict(atol=1e-5, rtol=0)


def _bounds(lengths):
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def _inputs(total, heads=4, groups=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, total, dim, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(groups), make(groups)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _one_at_a_time(q, k, v, lengths, window):
    outs = []
    for dq, dk, dv in zip(*(x.split(lengths, dim=2) for x in (q, k, v))):
        alone = [t.detach().clone().requires_grad_() for t in (dq, dk, dv)]
        outs.append(alone)
    return outs


@pytest.mark.parametrize("window", [WINDOW, 3, None], ids=["S-W8", "S-W3", "global"])
def test_kernel_equals_documents_one_at_a_time(window, cpu_kernel):  # noqa: F811
    total = sum(LENGTHS)
    q, k, v = _inputs(total)
    out = document_attention(q, k, v, torch.tensor(_bounds(LENGTHS), dtype=torch.int32), window)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    packed_grads = _grads(out, (q, k, v), grad_out)
    for index, (dq, dk, dv) in enumerate(_one_at_a_time(q, k, v, LENGTHS, window)):
        start, length = sum(LENGTHS[:index]), LENGTHS[index]
        alone = causal_attention(dq, dk, dv) if window is None else sliding_window_attention(dq, dk, dv, window)
        torch.testing.assert_close(out[:, :, start:start + length], alone, **TOL)
        g = grad_out[:, :, start:start + length]
        for packed, single in zip(packed_grads, _grads(alone, (dq, dk, dv), g)):
            torch.testing.assert_close(packed[:, :, start:start + length], single, **TOL)


def _dense_reference(q, k, v, cu_seqlens, window):
    q, k, v = (x.double() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = document_mask(cu_seqlens, q.shape[2], window)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("window", [WINDOW, None], ids=["S", "global"])
def test_kernel_equals_dense_float64_reference(window, cpu_kernel):  # noqa: F811
    total = sum(LENGTHS)
    q, k, v = _inputs(total, dtype=torch.float64, seed=3)
    cu = _bounds(LENGTHS)
    out = document_attention(q, k, v, cu, window)
    ref_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = _dense_reference(*ref_inputs, cu, window)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for ours, theirs in zip(_grads(out, (q, k, v), grad_out), _grads(ref, ref_inputs, grad_out)):
        torch.testing.assert_close(ours, theirs, atol=5e-6, rtol=0)


def test_masking_changes_the_result():
    """The oracle above could pass vacuously if masking did nothing: it must differ from
    attention over the whole pack on every document after the first."""
    total = sum(LENGTHS)
    q, k, v = _inputs(total)
    masked = document_attention(q, k, v, _bounds(LENGTHS), WINDOW)
    plain = sliding_window_attention(q, k, v, WINDOW)
    start = LENGTHS[0] + LENGTHS[1]  # the W-long document's first token sees only itself
    assert not torch.allclose(masked[:, :, start], plain[:, :, start])


def test_flex_mask_mod_equals_dense_mask():
    """The CUDA block mask's mask_mod (evaluated here on index grids) is the dense mask."""
    total = sum(LENGTHS)
    cu = _bounds(LENGTHS)
    ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    for window in (WINDOW, None):
        assert torch.equal(document_mask_mod(ids, window)(0, 0, i, j), document_mask(cu, total, window))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("qkv_format", "sbhd", "packed_seq_params.qkv_format"),
        ("cu_seqlens_kv", torch.tensor([0, 3, 10], dtype=torch.int32), "packed_seq_params.cu_seqlens_kv"),
        ("cu_seqlens_q_padded", torch.tensor([0, 8, 16], dtype=torch.int32), "packed_seq_params.cu_seqlens_q_padded"),
    ],
)
def test_packed_seq_params_the_backend_cannot_run_are_refused(field, value, message):
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=message):
        packed_cu_seqlens(params)


def test_bad_boundaries_name_the_row():
    with pytest.raises(ValueError, match=r"documents\[1\]: cu_seqlens must start at 0 and end at"):
        pack_documents([[0, 4, 10], [0, 4, 9]], 2, 10)


def test_positions_and_crossing_predictions():
    cu = [0, 1, 4, 6]
    assert document_positions(cu, 6).tolist() == [0, 0, 1, 2, 0, 1]
    assert crossing_predictions(cu, 6).tolist() == [True, False, False, True, False, False]


# --- whole model ----------------------------------------------------------------------


def _model(block, pattern):
    cfg = tiny_config(pattern=pattern, window=WINDOW, block=block,
                      **({"normalization": "LayerNorm", "norm_eps": 1e-5} if block == "parallel" else {}))
    model = build_model(cfg, cfg.to_transformer_config())
    fill_from_global(model, seeded_full_tensor(seed=11))
    return cfg, model


@pytest.mark.parametrize("block", ["sequential", "parallel"])
@pytest.mark.parametrize("pattern", ["SSSG", "SSSR"])
def test_model_equals_documents_one_at_a_time(megatron_single, block, pattern):
    """Logits, per-token loss and every parameter gradient of one packed sequence (two
    rows packed into one THD sequence, as Megatron-LM packs) equal those of its documents
    run one at a time as their own sequences (RoPE positions from 0 each)."""
    cfg, model = _model(block, pattern)
    rows = [LENGTHS, [30, 17]]
    total = sum(LENGTHS)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (2, total), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, total), generator=g)
    documents = [_bounds(r) for r in rows]

    logits = run_model(model, tokens, documents=documents)
    loss = run_model(model, tokens, labels, documents=documents)
    assert logits.shape == (2, total, cfg.vocab_size) and loss.shape == (2, total)
    model.zero_grad()
    loss.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    for row, lengths in enumerate(rows):
        for start, end in zip(documents[row], documents[row][1:]):
            alone_tokens, alone_labels = tokens[row:row + 1, start:end], labels[row:row + 1, start:end]
            torch.testing.assert_close(logits[row:row + 1, start:end], run_model(model, alone_tokens), **TOL)
            alone_loss = run_model(model, alone_tokens, alone_labels)
            torch.testing.assert_close(loss[row:row + 1, start:end], alone_loss, **TOL)
            alone_loss.sum().backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(packed_grads[name], param.grad, **TOL, msg=name)


def test_model_masking_changes_the_logits(megatron_single):
    cfg, model = _model("sequential", "SSSG")
    tokens = torch.randint(0, cfg.vocab_size, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(2))
    masked = run_model(model, tokens, documents=[_bounds(LENGTHS)])
    plain = run_model(model, tokens)
    assert torch.allclose(masked[:, :1], plain[:, :1], **TOL)  # the first document sees the same
    assert not torch.allclose(masked[:, 1:], plain[:, 1:], atol=1e-3)


# --- te backend: PackedSeqParams plumbing with a TE stand-in -----------------------------


class StandInTEDotProductAttention(torch.nn.Module):
    """What Megatron's ``TEDotProductAttention`` is given, recorded, and answered the way
    TE's varlen attention answers: attention within each ``cu_seqlens`` document, the
    window from ``config.window_size`` on the layers ``window_attn_skip_freq`` marks."""

    calls: list = []

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        from megatron.core.transformer.utils import is_layer_window_attention

        super().__init__()
        self.config, self.layer_number = config, layer_number
        sliding = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window = config.window_size[0] + 1 if sliding else None  # TE's (W-1, 0) -> HF's W

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        self.calls.append(dict(shape=tuple(query.shape), packed=packed_seq_params, mask_type=attn_mask_type))
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # THD [t, h, d]
        out = document_attention(q, k, v, packed_seq_params.cu_seqlens_q, self.window)
        return out[0].permute(1, 0, 2).reshape(query.shape[0], -1)


@pytest.fixture
def te_stand_in(monkeypatch):
    """The te spec with the stand-in core attention and Megatron's local linears / our norm
    (TE's modules are placeholders on CPU)."""
    from rnope_megatron.model import specs

    portable = specs._modules("portable")
    te_modules = dict(portable, core_attention=StandInTEDotProductAttention)
    monkeypatch.setattr(specs, "_modules", lambda backend: te_modules if backend == "te" else portable)
    StandInTEDotProductAttention.calls = []
    return StandInTEDotProductAttention


def test_te_gets_thd_packed_seq_params_as_megatron_passes_them(megatron_single, te_stand_in):
    """On te, TE's attention receives [t, h, d] queries and the pack's THD PackedSeqParams,
    RoPE restarts per document through Megatron's THD rotary path, and the model equals
    the portable one with document masking (same weights)."""
    cfg = tiny_config(pattern="SSSG", window=WINDOW)
    te_model = build_model(cfg, cfg.to_transformer_config(backend="te"), backend="te")
    portable_model = build_model(cfg, cfg.to_transformer_config())
    for model in (te_model, portable_model):
        fill_from_global(model, seeded_full_tensor(seed=11))
    tokens = torch.randint(0, cfg.vocab_size, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(4))
    documents = [_bounds(LENGTHS)]
    te_logits = run_model(te_model, tokens, documents=documents)
    torch.testing.assert_close(te_logits, run_model(portable_model, tokens, documents=documents), **TOL)
    calls = te_stand_in.calls
    assert len(calls) == cfg.num_layers
    heads = cfg.num_attention_heads
    for call in calls:
        assert call["shape"] == (sum(LENGTHS), heads, cfg.head_dim)
        packed = call["packed"]
        assert packed.qkv_format == "thd"
        assert packed.cu_seqlens_q.dtype == torch.int32 and packed.cu_seqlens_q.tolist() == documents[0]
        assert packed.max_seqlen_q == max(LENGTHS)


def test_te_refuses_fp8_attention_on_packed_documents(megatron_single, te_stand_in, monkeypatch):
    from rnope_megatron.common.errors import UserError

    cfg = tiny_config(pattern="SSSG", window=WINDOW)
    config = cfg.to_transformer_config(backend="te")
    model = build_model(cfg, config, backend="te")
    monkeypatch.setattr(config, "fp8", "hybrid", raising=False)
    monkeypatch.setattr(config, "fp8_dot_product_attention", True, raising=False)
    tokens = torch.zeros(1, sum(LENGTHS), dtype=torch.long)
    with pytest.raises(UserError, match=r"layer 1: fp8_dot_product_attention: .*never THD"):
        run_model(model, tokens, documents=[_bounds(LENGTHS)])


@pytest.mark.parametrize(
    "setting, refusal",
    [
        (dict(sliding=False, fp8_attention=False), None),
        (dict(sliding=True, fp8_attention=False), None),  # versions unknown: assumed recent
        (dict(sliding=True, fp8_attention=False, cudnn_version=(9, 5)), "window_size: .*cuDNN >= 9.6"),
        (dict(sliding=True, fp8_attention=False, cudnn_version=(9, 5), flash_attn_version=(2, 3)), None),
        (dict(sliding=True, fp8_attention=False, cudnn_version=(9, 8)), None),
        (dict(sliding=False, fp8_attention=True), "fp8_dot_product_attention"),
        (dict(sliding=True, fp8_attention=False, cp_size=2, cp_comm_type="p2p"), "cp_comm_type: p2p"),
        (dict(sliding=True, fp8_attention=False, cp_size=2, cp_comm_type="halo"), "cp_comm_type: halo"),
        (dict(sliding=True, fp8_attention=False, cp_size=2, cp_comm_type="a2a+p2p"), "cp_comm_type: a2a\\+p2p"),
        (dict(sliding=True, fp8_attention=False, cp_size=2, cp_comm_type="all_gather", te_version=(2, 17)),
         "cp_comm_type: all_gather .* 2.18"),
        (dict(sliding=True, fp8_attention=False, cp_size=2, cp_comm_type="all_gather", te_version=(2, 18)), None),
        (dict(sliding=True, fp8_attention=False, cp_size=4, cp_comm_type="a2a", heads_per_rank=8,
              groups_per_rank=2), "cp_comm_type: a2a needs .* query groups \\(2\\)"),
        (dict(sliding=True, fp8_attention=False, cp_size=2, cp_comm_type="a2a", heads_per_rank=8,
              groups_per_rank=2), None),
        (dict(sliding=False, fp8_attention=False, cp_size=2, cp_comm_type="p2p"), None),  # global layers: any
    ],
)
def test_te_thd_refusals(setting, refusal):
    from rnope_megatron.attention.te_documents import te_thd_refusal

    reason = te_thd_refusal(**setting)
    if refusal is None:
        assert reason is None
    else:
        assert reason is not None and "\n" not in reason
        import re

        assert re.search(refusal, reason), reason


# --- FLOP model and benchmark -----------------------------------------------------------


def test_pack_flops_count_the_key_visits_of_the_document_mask():
    """pack_forward_flops' attention term is 4·q FLOPs per visible (query, key) pair of
    the dense document mask, summed over layers; its linear term is the unmasked one."""
    from rnope_megatron.model.flops import forward_flops_breakdown, pack_forward_flops

    cfg = tiny_config(pattern="SSSG", window=WINDOW)
    total = sum(LENGTHS)
    q = cfg.num_attention_heads * cfg.head_dim
    visits = {w: int(document_mask(_bounds(LENGTHS), total, w).sum()) for w in (WINDOW, None)}
    attention = 4 * q * (3 * visits[WINDOW] + visits[None])
    parts = forward_flops_breakdown(cfg, total)
    linear = total * (sum(parts.values()) - parts["attention_sliding"] - parts["attention_global"])
    assert pack_forward_flops(cfg, LENGTHS) == pytest.approx(linear + attention, rel=1e-12)
    assert pack_forward_flops(cfg, [total]) == pytest.approx(total * sum(parts.values()), rel=1e-12)


def test_document_mask_benchmark_json(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "benchmarks/document_mask.py", "--seq-len", "256", "--doc-len", "64", "--window", "16",
         "--repeats", "1", "--threads", "1", "--json", "--png", str(tmp_path / "plot.png")],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(root / "benchmarks"))
    import document_mask as benchmark

    assert set(benchmark.ROW_KEYS) <= set(row)
    assert row["measured_speedup"] == pytest.approx(row["plain_ms"] / row["masked_ms"], rel=1e-9)
    assert row["flop_speedup"] > 1 and (tmp_path / "plot.png").stat().st_size > 0
