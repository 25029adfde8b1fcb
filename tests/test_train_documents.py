"""``data.document_mask`` through the trainer: Megatron's own ``inter_document_masking``
boundaries, the loss without predictions across documents, parallel layouts, kill -9 and
resume, the logged mean document length; ``rnope-eval loss --document-mask``.

Oracles: "the documents run one at a time" (each document of each sample its own
sequence through the same fresh model, no packing code involved) for the trainer's first
loss, 1e-5 absolute (fp32; measured ~1e-7); parallel layouts against the single process
2e-4 absolute (as tests/test_train.py: reduction order only); resume: bit-exact (==)."""

import json
import pathlib
import signal
import subprocess

import numpy
import pytest
import torch

from rnope_megatron.data.dataset import SampleShape, batch_for, build_dataset, sample_documents
from rnope_megatron.data.tokenizers import ByteTokenizer
from rnope_megatron.model.build import build_model, run_model
from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor
from rnope_megatron.recipe.loading import load_recipe
from rnope_megatron.recipe.validation import validate
from tests.trainer import FAST, RECIPE, assert_one_line_error, console_script, exit_status, losses, metrics, train

EOD = ByteTokenizer().eod
# half the samples are the retrieval mix: two cases of half a sample each
MASKED = ["data.document_mask=true", "data.retrieval_fraction=0.5", "train.state_digest=true"]


def _recipe(data_cache, *overrides):
    recipe = load_recipe(RECIPE, [*FAST, *MASKED, f"data.cache_dir={data_cache}", *overrides])
    validate(recipe)
    return recipe


def _dataset(recipe):
    t = recipe.train
    return build_dataset(recipe.data, SampleShape.of(recipe), pathlib.Path(recipe.data.cache_dir),
                         t.iters * t.global_batch_size)


def _global_batch(recipe, dataset, iteration):
    t = recipe.train
    return [batch_for(dataset, iteration, m, t, 0, 1) for m in range(t.global_batch_size // t.micro_batch_size)]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("masked")
    train(run_dir, f"data.cache_dir={data_cache}", *MASKED)
    return run_dir


def test_samples_are_megatrons_documents_and_crossings_are_not_trained(data_cache):
    """Boundaries come from Megatron's index: each internal one follows an EOD and every
    EOD inside a sample ends a document; the default corpus and the retrieval mix both
    give multi-document samples; the loss mask drops exactly the predictions across a
    boundary (the EOD's); the corpus samples are those of the unmasked dataset."""
    # 1024 tokens: half a sample holds a retrieval case with room for its haystack
    recipe = _recipe(data_cache, "train.seq_length=1024")
    dataset = _dataset(recipe)
    length, seen = recipe.train.seq_length, {"retrieval": 0, "corpus": 0}
    for iteration in range(recipe.train.iters):
        for batch in _global_batch(recipe, dataset, iteration):
            for row in range(batch["tokens"].shape[0]):
                tokens, bounds = batch["tokens"][row], sample_documents(batch["cu_seqlens"][row])
                eods = (tokens == EOD).nonzero().flatten().tolist()
                assert bounds == [0, *[p + 1 for p in eods if p + 1 < length], length]
                assert (batch["loss_mask"][row] == 0).nonzero().flatten().tolist() == eods
                if len(bounds) > 2:
                    seen["retrieval" if bounds == [0, length // 2, length] else "corpus"] += 1
    assert seen["retrieval"] > 0 and seen["corpus"] > 0, seen
    corpus_only = [_recipe(data_cache, "data.retrieval_fraction=0", f"data.document_mask={on}") for on in ("true", "false")]
    masked, plain = (_global_batch(r, _dataset(r), 0) for r in corpus_only)
    for ours, reference in zip(masked, plain):
        assert torch.equal(ours["tokens"], reference["tokens"]) and torch.equal(ours["labels"], reference["labels"])
        assert "cu_seqlens" not in reference


def test_first_loss_equals_the_documents_run_one_at_a_time(masked_run, data_cache, megatron_single):
    """The trainer's iteration-1 loss (fresh weights) against the same fresh model run
    on each document of each sample alone, averaged over the trained predictions."""
    recipe = _recipe(data_cache)
    config = recipe.model.to_transformer_config(recipe.parallel, params_dtype=recipe.train.precision)
    model = build_model(recipe.model, config)
    fill_from_global([model], seeded_full_tensor(recipe.train.seed, recipe.model.init_method_std))
    total, count, documents = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in _global_batch(recipe, _dataset(recipe), 0):
            for row in range(batch["tokens"].shape[0]):
                bounds = sample_documents(batch["cu_seqlens"][row])
                for start, end in zip(bounds, bounds[1:]):
                    per_token = run_model(model, batch["tokens"][row:row + 1, start:end],
                                          batch["labels"][row:row + 1, start:end]).double()
                    mask = batch["loss_mask"][row, start:end].double()
                    total += float((per_token[0] * mask).sum())
                    count += float(mask.sum())
                    documents += 1
    first = metrics(masked_run)[0]
    assert first["loss"] == pytest.approx(total / count, abs=1e-5)
    assert first["mean_document_length"] == pytest.approx(first["tokens"] / documents, abs=0.05)
    assert documents > recipe.train.global_batch_size  # the batch held more than one document per sample


@pytest.mark.parametrize("layout", [["parallel.context=2", "train.micro_batch_size=1"], ["parallel.pipeline=2"]],
                         ids=["cp2", "pp2"])
def test_parallel_layouts_follow_the_single_process_with_documents(masked_run, tmp_path, data_cache, layout):
    """Against one process with the same micro-batches: Megatron averages per-micro-batch
    mean losses, and with documents micro-batches train different token counts."""
    single = masked_run
    if "train.micro_batch_size=1" in layout:
        single = tmp_path / "single"
        train(single, f"data.cache_dir={data_cache}", *MASKED, "train.micro_batch_size=1")
    train(tmp_path / "parallel", f"data.cache_dir={data_cache}", *MASKED, *layout, nproc=2)
    reference, ours = losses(single), losses(tmp_path / "parallel")
    assert ours.keys() == reference.keys()
    for iteration in reference:
        assert ours[iteration] == pytest.approx(reference[iteration], abs=2e-4), iteration
    assert [m["mean_document_length"] for m in metrics(tmp_path / "parallel")] == \
        [m["mean_document_length"] for m in metrics(masked_run)]


def test_kill_9_and_resume_with_documents_is_bit_exact(masked_run, tmp_path, data_cache):
    common = [f"data.cache_dir={data_cache}", *MASKED, "checkpoint.interval=2"]
    proc = train(tmp_path, *common, check=False, env={"RNOPE_FAULT": "kill@after_step:3"})
    assert proc.returncode == -signal.SIGKILL
    out = train(tmp_path, *common)
    assert f"resumed from {tmp_path}/checkpoints/iter_0000002" in out.stdout
    assert losses(tmp_path) == losses(masked_run)
    assert [m["state_digest"] for m in metrics(tmp_path)] == [m["state_digest"] for m in metrics(masked_run)]
    assert exit_status(tmp_path)["state_digest"] == exit_status(masked_run)["state_digest"]
    assert "doc " in out.stdout  # the console line shows the mean document length


def test_document_mask_refusals_name_the_field(data_cache):
    with pytest.raises(ValueError, match=r"^train\.micro_batch_size=2: with data\.document_mask under parallel\.context=2"):
        _recipe(data_cache, "parallel.context=2")
    # te under CP would need Megatron's per-document split: refused, pointing to portable
    with pytest.raises(ValueError, match=r"^data\.document_mask with parallel\.context=2 runs on train\.backend=portable"):
        _recipe(data_cache, "train.backend=te", "parallel.context=2", "train.micro_batch_size=1",
                "parallel.context_comm_sliding=all_gather")
    _recipe(data_cache, "parallel.context=2", "train.micro_batch_size=1")  # portable: the halo exchange
    with pytest.raises(ValueError, match=r"train\.fp8\.attention: fp8_dot_product_attention: TE's FP8 attention"):
        _recipe(data_cache, "train.backend=te", "train.precision=bf16", "train.fp8.attention=all")
    _recipe(data_cache, "train.backend=te", "train.precision=bf16", "train.fp8.attention=off")


def test_rnope_train_refuses_document_mask_it_cannot_run_in_one_line(tmp_path, data_cache):
    proc = subprocess.run([console_script("rnope-train"), RECIPE, *FAST, f"logging.run_dir={tmp_path / 'run'}",
                           "data.document_mask=true", "parallel.context=2"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "rnope-train", "train.micro_batch_size=2", "data.document_mask")
    assert not (tmp_path / "run").exists()


def test_rnope_eval_loss_of_a_pack_equals_its_documents_alone(saved_run, tmp_path):
    """``--document-mask``: loss and tokens over the trained predictions of a pack equal
    those of its documents run one at a time (each document with its EOD, alone)."""
    rng = numpy.random.default_rng(0)
    documents = [[int(x) for x in rng.integers(0, 256, n)] + [EOD] for n in (1, 5, 40, 17)]
    cut = [int(x) for x in rng.integers(0, 256, 9)]  # the last document, cut by the row's end
    rows = [sum(documents, []) + cut, sum(documents[::-1], []) + cut]
    numpy.save(tmp_path / "pack.npy", numpy.array(rows))

    def loss(path, *extra):
        proc = subprocess.run([console_script("rnope-eval"), "loss", "--checkpoint", str(saved_run / "checkpoints"),
                               "--input-ids", str(path), "--json", *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    packed = loss(tmp_path / "pack.npy", "--document-mask")
    alone_sum, alone_tokens = 0.0, 0
    for document in documents + [cut]:  # each of the two rows holds every document once
        numpy.save(tmp_path / "doc.npy", numpy.array([document]))
        alone = loss(tmp_path / "doc.npy")
        alone_sum += len(rows) * alone["loss"] * alone["tokens"]
        alone_tokens += len(rows) * alone["tokens"]
    assert packed["tokens"] == alone_tokens
    assert packed["loss"] == pytest.approx(alone_sum / alone_tokens, abs=1e-5)
    assert packed["document_mask"] is True and packed["eod"] == EOD
    plain = loss(tmp_path / "pack.npy")
    assert abs(plain["loss"] - packed["loss"]) > 1e-3  # the mask changes what is computed


def test_rnope_eval_document_mask_misuse_fails_in_one_line(saved_run, tmp_path):
    checkpoint = str(saved_run / "checkpoints")
    numpy.save(tmp_path / "ids.npy", numpy.array([[1, 2, EOD, 3]]))
    proc = subprocess.run([console_script("rnope-eval"), "loss", "--checkpoint", checkpoint, "--data", "tiny-cpu",
                           "--length", "16", "--document-mask"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "rnope-eval", "--document-mask needs --input-ids")
    proc = subprocess.run([console_script("rnope-eval"), "loss", "--checkpoint", checkpoint, "--input-ids",
                           str(tmp_path / "ids.npy"), "--eod", "256"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "rnope-eval", "--eod is used only with --document-mask")
