"""FLOP model against the paper's speed-ups for its 8B analysis model (arXiv 2501.18795:
x1.24 at 32k ... x2.43 at 256k over the all-global RoPE baseline, W=4096), and the
synthetic retrieval data."""

import pytest

from rnope_megatron.data.corpora import retrieval_documents
from rnope_megatron.data.tokenizers import ByteTokenizer
from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.model.flops import attention_span, forward_flops_per_token


def test_attention_span_counts_keys_exactly():
    assert attention_span(8, None) == pytest.approx(sum(range(1, 9)) / 8)
    assert attention_span(8, 3) == pytest.approx(sum(min(i, 3) for i in range(1, 9)) / 8)


@pytest.mark.parametrize("seq, speedup", [(32768, 1.24), (65536, 1.51), (131072, 1.92), (262144, 2.43)])
def test_rnope_speedup_over_rope_baseline_matches_paper_scale(seq, speedup):
    """8B analysis model, W=4096, 1 global layer in 4, vs the all-global RoPE baseline."""
    shape = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                 ffn_hidden_size=14336, vocab_size=256000, max_seq_length=seq, window=4096)
    hybrid = RNoPEConfig(pattern="SSSG", **shape)
    baseline = RNoPEConfig(pattern="R", **shape)
    approx = forward_flops_per_token(baseline, seq, exact=False) / forward_flops_per_token(hybrid, seq, exact=False)
    assert approx == pytest.approx(speedup, abs=0.005)  # the usual convention: spans L/2 and W
    exact = forward_flops_per_token(baseline, seq) / forward_flops_per_token(hybrid, seq)
    assert approx <= exact <= approx + 0.01  # exact windows are shorter near the sequence start


def test_retrieval_documents_hide_and_ask_the_answer():
    docs = list(retrieval_documents(4, seed=0))
    passkey, kv = docs[0], docs[1]
    key = passkey.answer.strip()
    assert len(key) == 5 and passkey.needle.count(key) == 2 and passkey.question.endswith("The pass key is")
    text = passkey.text("x" * 40)
    assert text.endswith(f"The pass key is {key}.") and text.count("x") == 40
    probe = kv.question.split('"')[1]
    assert f'"{probe}": "{kv.answer}",' in kv.needle and kv.tail == '".'
    assert list(retrieval_documents(4, seed=0)) == docs  # deterministic
    assert all(d.question == passkey.question for d in retrieval_documents(6, seed=1, tasks=("passkey",)))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.tokenize("héllo")
    assert max(ids) < 256 and tok.detokenize(ids + [tok.eod]) == "héllo"


def _retrieval_dataset(tmp_path, **data):
    from rnope_megatron.data.dataset import SampleShape, build_dataset
    from rnope_megatron.recipe import recipe_from_dict

    recipe = recipe_from_dict({"data": {"source": "synthetic-retrieval", **data},
                               "train": {"seq_length": 256, "seed": 3, "iters": 50, "global_batch_size": 8},
                               "model": {"vocab_size": 272}})
    return build_dataset(recipe.data, SampleShape.of(recipe), tmp_path, 400)


def test_every_retrieval_sample_is_one_whole_case(tmp_path):
    """A retrieval case is exactly one training sequence (EOD last), so Megatron's samples
    (stride seq_length) each hold one whole case: needle and answer agree, the question
    ends the sample, and no earlier needle precedes it. (Half-sequence documents gave 44%
    whole cases at 256 tokens, whole-sequence ones cut at random 15%.)"""
    import re

    dataset = _retrieval_dataset(tmp_path, retrieval_tasks=["passkey"])
    tok = ByteTokenizer()
    for i in range(400):
        sample = dataset[i]
        text = tok.detokenize(sample["tokens"].tolist())
        found = re.fullmatch(r"[^\d]*The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.[^\d]*"
                             r"What is the pass key\? The pass key is (\d{5})\.", text)
        assert found and found.group(1) == found.group(2) == found.group(3), text
        assert int(sample["tokens"][-1]) == tok.eod and bool(sample["loss_mask"].all())


def test_answers_only_loss_trains_exactly_the_answers(tmp_path):
    """data.retrieval_loss=answers: the loss mask is 1 on the answer's labels only, the
    ids come back unmarked (below the vocabulary), for both tasks of the mix."""
    dataset = _retrieval_dataset(tmp_path, retrieval_loss="answers")
    tok = ByteTokenizer()
    kinds = set()
    for i in range(100):
        sample = dataset[i]
        assert int(sample["tokens"].max()) < 272 and int(sample["labels"].max()) < 272
        text = tok.detokenize(sample["tokens"].tolist())
        trained = tok.detokenize(sample["labels"][sample["loss_mask"] > 0].tolist())
        if "pass key" in text:
            kinds.add("passkey")
            assert trained == " " + text.split("The pass key is ")[1][:5]
        else:
            kinds.add("key_value")
            probe = text.rsplit('The value of key "', 1)[1].split('"')[0]
            assert trained == text.split(f'"{probe}": "')[1][:6]
    assert kinds == {"passkey", "key_value"}


def test_answers_only_loss_leaves_the_other_sources_whole(tmp_path):
    from rnope_megatron.data.dataset import SampleShape, build_dataset
    from rnope_megatron.recipe import recipe_from_dict

    recipe = recipe_from_dict({"data": {"source": "default", "retrieval_fraction": 0.5, "retrieval_loss": "answers"},
                               "train": {"seq_length": 256, "seed": 3, "iters": 50, "global_batch_size": 8},
                               "model": {"vocab_size": 272}})
    dataset = build_dataset(recipe.data, SampleShape.of(recipe), tmp_path, 200)
    counts = [int(dataset[i]["loss_mask"].sum()) for i in range(200)]
    assert 60 < sum(c == 256 for c in counts) < 140  # the corpus' samples: every label trained
    assert all(c == 256 or c == 6 for c in counts)    # retrieval samples: the 6 answer tokens


def test_a_source_weighted_zero_is_not_drawn_from(tmp_path):
    """Megatron's BlendedDataset asserts every weight > 0 (a bare AssertionError deep in
    the build): data.retrieval_fraction=1 with the default corpus, or a 0 in data.weights,
    leaves that source out; every sample then comes from the others."""
    from rnope_megatron.data.dataset import SampleShape, build_dataset, dataset_prefixes
    from rnope_megatron.data.indexed import write_indexed
    from rnope_megatron.recipe.sections import DataSection

    shape = SampleShape(seq_length=64, seed=1, vocab_size=272, planned_samples=16)
    only_retrieval = DataSection(source="default", retrieval_fraction=1.0, retrieval_tasks=["passkey"])
    paths, weights = dataset_prefixes(only_retrieval, shape, tmp_path, ByteTokenizer())
    assert len(paths) == 1 and "retrieval-" in paths[0] and weights is None
    dataset = build_dataset(only_retrieval, shape, tmp_path, 16)
    assert len(dataset) >= 16 and dataset[0]["tokens"].shape == (64,)
    write_indexed(tmp_path / "a", [[1, 2, 3, 256]] * 50, 257)
    write_indexed(tmp_path / "b", [[4, 5, 256]] * 50, 257)
    zero = DataSection(source="indexed", paths=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[0.0, 1.0])
    assert dataset_prefixes(zero, shape, tmp_path, ByteTokenizer()) == ([str(tmp_path / "b")], None)
    samples = build_dataset(zero, shape, tmp_path, 8)
    assert all(set(samples[i]["tokens"].tolist()) <= {4, 5, 256} for i in range(8))
