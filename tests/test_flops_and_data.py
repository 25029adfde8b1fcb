"""FLOP model against the paper's speed-ups for its 8B analysis model (arXiv 2501.18795:
x1.24 at 32k ... x2.43 at 256k over the all-global RoPE baseline, W=4096), and the
synthetic retrieval data."""

import pytest

from rnope_megatron.config import RNoPEConfig
from rnope_megatron.flops import attention_span, forward_flops_per_token
from rnope_megatron.data.corpora import retrieval_documents
from rnope_megatron.data.tokenizers import ByteTokenizer


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
    docs = list(retrieval_documents(4, 400, seed=0))
    assert len(docs) == 4 and all(380 <= len(d) <= 460 for d in docs)
    passkey = docs[0]
    key = passkey.split("The pass key is ")[1].split(".")[0]
    assert passkey.endswith(f"The pass key is {key}.") and passkey.count(key) == 3
    kv = docs[1]
    probe = kv.split('The value of key "')[1].split('"')[0]
    value = kv.rsplit('"', 2)[1]
    assert f'"{probe}": "{value}",' in kv
    assert list(retrieval_documents(4, 400, seed=0)) == docs  # deterministic


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.tokenize("héllo")
    assert max(ids) < 256 and tok.detokenize(ids + [tok.eod]) == "héllo"


def test_training_samples_hold_whole_passkey_cases(tmp_path):
    """The retrieval mix's documents are half a sequence: a sample (a stride-seq_length
    cut of the concatenated documents) then often holds needle, question and answer
    together. Whole-sequence documents gave 15% at 256 tokens (5% at 128)."""
    import re

    from rnope_megatron.data.dataset import build_dataset
    from rnope_megatron.data.tokenizers import ByteTokenizer
    from rnope_megatron.train.recipe import recipe_from_dict

    recipe = recipe_from_dict({"data": {"source": "synthetic-retrieval"}, "train": {"seq_length": 256, "seed": 3},
                               "model": {"vocab_size": 272}})
    dataset = build_dataset(recipe, tmp_path, 400)
    whole = 0
    for i in range(400):
        text = ByteTokenizer().detokenize(dataset[i]["tokens"].tolist() + dataset[i]["labels"][-1:].tolist())
        found = re.search(r"The pass key is (\d{5})\. Remember[^\n]*?What is the pass key\? The pass key is (\d{5})",
                          text)
        whole += bool(found and found.group(1) == found.group(2))
    assert whole / 400 > 0.3
