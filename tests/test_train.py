"""rnope-train end to end on CPU: Megatron's real DDP, optimizer, schedules and
dist-checkpointing under gloo, launched as a user would (python -m / torchrun).

Tolerances: parallel layouts vs one process 2e-4 absolute on per-iteration losses over
6 Adam steps (fp32; only reduction order differs, measured ~1e-6); resume after kill -9:
bit-exact (==)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer import ROOT, exit_status, losses, metrics, train, train_cmd


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("single")
    out = train(run_dir, f"data.cache_dir={data_cache}")
    return run_dir, out


def test_single_process_trains_logs_and_checkpoints(single):
    run_dir, out = single
    records = metrics(run_dir)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "eta_s"):
        assert key in records[0]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learns
    assert abs(records[0]["loss"] - 6.24) < 0.2  # ln(512): a fresh model
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert "iter      6/6" in out.stdout and "eta" in out.stdout
    assert f"metrics {run_dir}/metrics.jsonl" in out.stdout


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor=2"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        ["parallel.pipeline=2"],
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
        [],  # data parallel 2
        ["parallel.context=2"],  # halo exchange (S layers), all-gather (G layers)
    ],
    ids=["tp2", "tp2-sp", "pp2", "pp2-vpp2", "dp2", "cp2"],
)
def test_parallel_layouts_follow_the_single_process_trajectory(single, tmp_path, data_cache, layout):
    reference = losses(single[0])
    train(tmp_path, f"data.cache_dir={data_cache}", *layout, nproc=2)
    ours = losses(tmp_path)
    assert ours.keys() == reference.keys()
    for iteration in reference:
        assert ours[iteration] == pytest.approx(reference[iteration], abs=2e-4), iteration
    # each token counted once, whatever the layout (CP and DP ranks hold different ones)
    assert [m["tokens"] for m in metrics(tmp_path)] == [8 * 128] * len(reference)


def test_every_token_is_logged_once_whatever_the_intervals(tmp_path, data_cache):
    """Logging every 4 iterations, saving every 3: each checkpoint also writes a record, so
    the records' token counts add up to every token trained (a save once dropped the
    tokens logged since the last record, and a resume could skip them)."""
    train(tmp_path, f"data.cache_dir={data_cache}", "logging.interval=4", "checkpoint.interval=3")
    records = metrics(tmp_path)
    assert [r["iteration"] for r in records] == [3, 4, 6]
    assert sum(r["tokens"] for r in records) == 6 * 8 * 128


def test_torchrun_with_one_process_matches_plain_python(single, tmp_path, data_cache):
    """One GPU is ``torchrun --nproc-per-node=1``: the worker must join torchrun's store
    (a replaced MASTER_PORT once left it waiting for a server that never came)."""
    train(tmp_path, f"data.cache_dir={data_cache}", nproc=1, timeout=240)
    assert losses(tmp_path) == losses(single[0])


def test_kill_9_and_resume_is_bit_exact(tmp_path, data_cache):
    """A run killed with SIGKILL at a fixed point (right after iteration 5's step, by the
    RNOPE_FAULT hook: no polling, no race with the machine's load) and resumed from its
    latest checkpoint ends bit-identical to an uninterrupted run: every loss equal, each
    iteration logged once, and equal SHA-256 digests of all parameters and optimizer state
    (a logged float32 loss can hide a 1-ulp divergence; the digest cannot)."""
    common = [f"data.cache_dir={data_cache}", "train.iters=10", "checkpoint.interval=2", "train.state_digest=true"]
    full = tmp_path / "full"
    train(full, *common)
    killed = tmp_path / "killed"
    proc = train(killed, *common, check=False, env={"RNOPE_FAULT": "kill@after_step:5"})
    assert proc.returncode == -signal.SIGKILL
    assert [m["iteration"] for m in metrics(killed)] == [1, 2, 3, 4, 5]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    out = train(killed, *common)
    assert f"resumed from {killed}/checkpoints/iter_0000004" in out.stdout
    assert [m["iteration"] for m in metrics(killed)] == list(range(1, 11))  # each iteration once
    # the state after every iteration (iterations 1-4: the killed process; 5-10: the resumed one)
    digests = {name: {m["iteration"]: m["state_digest"] for m in metrics(run)} for name, run in
               (("full", full), ("killed", killed))}
    differing = [i for i in range(1, 11) if digests["killed"][i] != digests["full"][i]]
    assert not differing, f"states differ after iterations {differing} (1-4 ran before the kill, 5-10 after the resume)"
    assert losses(killed) == losses(full)  # bit-exact, every iteration
    assert exit_status(killed)["state_digest"] == exit_status(full)["state_digest"]
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000008", "iter_0000010"]  # checkpoint.keep=2 (the recipe's)


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_cache):
    proc = subprocess.Popen(train_cmd(tmp_path, f"data.cache_dir={data_cache}", "train.iters=200"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not metrics(tmp_path):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert "stopped by SIGTERM" in stdout
    last = max(losses(tmp_path))
    assert last < 200
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"


def test_checkpoint_from_tp2_resumes_under_pp2(single, tmp_path, data_cache):
    """Resharding: model and optimizer saved with TP=2 load with PP=2 and the run continues
    on the single-process trajectory."""
    common = [f"data.cache_dir={data_cache}"]
    train(tmp_path, *common, "parallel.tensor=2", "train.stop_at=3", nproc=2)
    assert max(losses(tmp_path)) == 3
    out = train(tmp_path, *common, "parallel.pipeline=2", nproc=2)
    assert "resumed from" in out.stdout and "iter_0000003" in out.stdout
    reference, ours = losses(single[0]), losses(tmp_path)
    for iteration in (4, 5, 6):
        assert ours[iteration] == pytest.approx(reference[iteration], abs=2e-4), iteration


def test_checkpoints_move_between_context_parallel_sizes(single, tmp_path, data_cache):
    """CP splits activations, not weights: a run saved under CP=2 resumes under CP=1 and
    one saved under CP=1 resumes under CP=2, both on the one-process trajectory."""
    common = [f"data.cache_dir={data_cache}"]
    reference = losses(single[0])
    for first, then, name in ((["parallel.context=2"], [], "cp2-to-cp1"), ([], ["parallel.context=2"], "cp1-to-cp2")):
        run_dir = tmp_path / name
        train(run_dir, *common, *first, "train.stop_at=3", nproc=2 if first else None)
        out = train(run_dir, *common, *then, nproc=2 if then else None)
        assert "resumed from" in out.stdout and "iter_0000003" in out.stdout
        ours = losses(run_dir)
        for iteration in (4, 5, 6):
            assert ours[iteration] == pytest.approx(reference[iteration], abs=2e-4), (name, iteration)


def test_distributed_optimizer_checkpoint_resumes_on_the_same_trajectory(single, tmp_path, data_cache):
    """Megatron's distributed optimizer (the GPU default) over DP=2: save at iteration 3,
    resume, and every loss stays on the single-process trajectory. Before the fixes in
    checkpoint.py, megatron-core 0.19 without TE/Apex could not save it (deprecated default
    format), then not load it (no Adam ``step``), then restarted Adam's bias correction.
    A TP change is refused with the field to change, since dp_reshardable cannot reshard TP."""
    common = [f"data.cache_dir={data_cache}", "optimizer.distributed=true"]
    train(tmp_path, *common, "train.stop_at=3", nproc=2)
    out = train(tmp_path, *common, nproc=2)
    assert "resumed from" in out.stdout and "iter_0000003" in out.stdout
    reference, ours = losses(single[0]), losses(tmp_path)
    assert ours.keys() == reference.keys()
    for iteration in reference:
        assert ours[iteration] == pytest.approx(reference[iteration], abs=2e-4), iteration
    refused = train(tmp_path, *common, "parallel.tensor=2", nproc=2, check=False)
    assert refused.returncode != 0
    assert "checkpoint.optimizer_format=dp_reshardable" in refused.stdout + refused.stderr


def test_fully_reshardable_without_fused_adam_is_refused_at_start(tmp_path, data_cache):
    """megatron-core 0.19 cannot load a fully_reshardable distributed-optimizer checkpoint
    into torch's Adam: the run must say so before training, not at its first resume."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        pytest.skip("TE or Apex is installed")
    out = train(tmp_path, f"data.cache_dir={data_cache}", "optimizer.distributed=true",
                "checkpoint.optimizer_format=fully_reshardable", check=False)
    assert out.returncode != 0 and not metrics(tmp_path)
    assert "checkpoint.optimizer_format=fully_reshardable needs TE or Apex" in out.stdout + out.stderr


def test_long_context_stage_starts_from_pretrained_weights(single, tmp_path, data_cache):
    """Stage 2 at twice the sequence length, weights from stage 1, fresh optimizer; no
    RoPE rescaling is involved (NoPE global layers, windowed RoPE layers)."""
    stage1_ckpt = single[0] / "checkpoints"
    common = [f"data.cache_dir={data_cache}", "train.seq_length=256", "train.iters=3"]
    out = train(tmp_path / "stage2", *common, f"checkpoint.load={stage1_ckpt}", "checkpoint.reset_optimizer=true")
    assert "(weights only) at iteration 0" in out.stdout
    fresh = tmp_path / "fresh"
    train(fresh, *common)
    assert losses(tmp_path / "stage2")[1] < losses(fresh)[1] - 0.5


def test_non_finite_loss_stops_with_the_iteration(tmp_path, data_cache):
    out = train(tmp_path, f"data.cache_dir={data_cache}", "optimizer.lr=1e30", "optimizer.min_lr=0",
                "optimizer.clip_grad=0", "train.max_nan_skips=1", check=False)
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in message and "max_nan_skips=1" in message
    skipped = [m["iteration"] for m in metrics(tmp_path) if m["skipped"]]
    assert len(skipped) == 2 and f"at iteration {skipped[-1]} " in message


def test_preprocess_then_train_on_indexed_data(tmp_path, data_cache):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * 40}) for i in range(200)))
    subprocess.run([sys.executable, "-m", "rnope_megatron.data.preprocess", "--input", str(docs),
                    "--output-prefix", str(tmp_path / "corpus")], check=True, cwd=ROOT, capture_output=True)
    assert (tmp_path / "corpus.bin").stat().st_size > 0 and (tmp_path / "corpus.idx").exists()
    train(tmp_path / "run", "data.source=indexed", f"data.paths=[{tmp_path / 'corpus'}]",
          "data.retrieval_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}", "train.iters=3")
    assert len(losses(tmp_path / "run")) == 3


def test_preprocess_names_the_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    out = subprocess.run([sys.executable, "-m", "rnope_megatron.data.preprocess", "--input", str(bad),
                          "--output-prefix", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and f"{bad}:2: not JSON" in out.stderr
    assert not (tmp_path / "x.idx").exists()  # nothing half-written under the final name


def test_preprocess_with_a_hugging_face_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from rnope_megatron.data.tokenizers import HFTokenizer

    words = ["<|endoftext|>", "[UNK]", "hello", "world", "again"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = tmp_path / "a.txt"
    text.write_text("hello world again hello")
    out = subprocess.run([sys.executable, "-m", "rnope_megatron.data.preprocess", "--input", str(text),
                          "--output-prefix", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "tokenizer.json")],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    assert "1 documents, 5 tokens (vocab 5)" in out.stdout
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(tmp_path / "c"))  # keep it alive: items are views of its mmap
    ids = dataset[0].tolist()
    assert ids == [2, 3, 4, 2, HFTokenizer(str(tmp_path / "tokenizer.json")).eod]


def test_cuda_fusions_without_te_build_a_valid_transformer_config():
    """train.fusions (default on CUDA) must not ask Megatron for TE's fused RoPE when TE is
    absent: TransformerConfig raises for apply_rope_fusion without it, which would stop every
    portable-backend GPU run on a machine without TE."""
    from rnope_megatron.model.config import RNoPEConfig
    from rnope_megatron.model.fusions import fusion_overrides, te_rope_fusion_available

    if te_rope_fusion_available():
        pytest.skip("TE is installed: the fused RoPE is available")
    config = RNoPEConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128)
    flags = fusion_overrides(True, "portable")
    assert flags == dict(apply_rope_fusion=False, bias_activation_fusion=True, bias_dropout_fusion=True,
                         gradient_accumulation_fusion=False)
    built = config.to_transformer_config(**flags)
    assert built.bias_activation_fusion and not built.apply_rope_fusion
    with pytest.raises(ValueError, match="apply_rope_fusion"):  # what the old flags did
        config.to_transformer_config(apply_rope_fusion=True)
    assert fusion_overrides(False, "te") == {}
