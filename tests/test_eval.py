"""rnope-eval (passkey, niah, loss) and the training-time eval gates.

* prompts: exact length, the needle at its depth, the answer the key;
* scoring: a causal retrieval oracle (sees only the prefix of each position, as a model
  does) scores 1.0; the same oracle one position late scores 0.0 (an off-by-one in the
  scoring would swap these); a random Megatron model scores near chance (0);
* the --hf path runs transformers' exported class and agrees with the checkpoint path;
* the installed console script writes its JSON and PNG files and fails in one line;
* the gate does not change training: equal losses and state digests with and without
  gates, and bit-exact through a kill -9 and resume with gates on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal

import pytest
import torch

from rnope_megatron.data.corpora import key_value_question, passkey_needle, passkey_question
from rnope_megatron.data.tokenizers import ByteTokenizer
from rnope_megatron.eval.scoring import evaluate_grid, score_cases
from rnope_megatron.eval.tasks import Haystacks, build_case, build_grid, minimum_length
from tests.trainer import ROOT, assert_one_line_error, eval_cli, exit_status, losses, metrics, train

BYTES = ByteTokenizer()
VOCAB = 272


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("task", ["passkey", "niah"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_case_has_the_length_the_needle_at_its_depth_and_the_key_as_answer(task, depth):
    case = build_case(task, 700, depth, 3, 0, Haystacks(BYTES))
    assert len(case.ids) == 700
    text = BYTES.detokenize(case.ids)
    answer = BYTES.detokenize(case.answer)
    if task == "passkey":
        needle = re.search(r" The pass key is (\d{5})\. Remember it\.", text)
        assert needle and answer == f" {needle.group(1)}"
        assert text.endswith(f"What is the pass key? The pass key is{answer}")
        needle_len = len(passkey_needle(needle.group(1)))
        question_len = len(passkey_question())
    else:
        probe = re.search(r'The value of key "([0-9a-f]{6})" is "([0-9a-f]{6})$', text)
        assert probe and answer == probe.group(2)
        needle = re.search(r' ("[0-9a-f]{6}": "[0-9a-f]{6}", ){8}', text)
        assert needle and f'"{probe.group(1)}": "{answer}",' in needle.group(0)
        needle_len, question_len = len(needle.group(0)), len(key_value_question(probe.group(1)))
    room = 700 - needle_len - question_len - len(case.answer)
    assert needle.start() == round(depth * room)  # bytes: one token per character


def test_cases_are_reproducible_and_differ_between_samples():
    a = build_grid("passkey", [300], [0.5], 4, 7, BYTES)[(300, 0.5)]
    b = build_grid("passkey", [300], [0.5], 4, 7, BYTES)[(300, 0.5)]
    assert a == b
    assert len({c.answer for c in a}) == 4


def test_too_short_length_is_refused_naming_it():
    shortest = minimum_length("passkey", BYTES)
    with pytest.raises(ValueError, match=f"length {shortest - 1} is too short"):
        build_case("passkey", shortest - 1, 0.0, 0, 0, Haystacks(BYTES))


# ----------------------------------------------------------------------------- scoring

def _oracle_next(text: str) -> str:
    """What a perfect retriever predicts after ``text`` (a prefix of a prompt): the next
    character of the answer it has found in the haystack."""
    asked = re.search(r"The pass key is( ?\d*)$", text)
    needle = re.search(r"The pass key is (\d{5})\.", text)
    if asked and needle and needle.start() != asked.start():
        answer = " " + needle.group(1)
        return answer[len(asked.group(1))] if len(asked.group(1)) < len(answer) else "."
    asked = re.search(r'The value of key "([0-9a-f]{6})" is "([0-9a-f]*)$', text)
    if asked:
        value = re.search(f'"{asked.group(1)}": "([0-9a-f]{{6}})",', text).group(1)
        return value[len(asked.group(2))] if len(asked.group(2)) < 6 else '"'
    return "."


def causal_oracle(lag: int = 0, tail: int = 12):
    """Logits whose argmax at position p is the oracle's prediction from ids[:p+1-lag]
    only (causal, like a model); computed for the last ``tail`` positions."""

    def logits(ids):
        out = torch.zeros(ids.shape[0], ids.shape[1], 257)
        for row in range(ids.shape[0]):
            for p in range(ids.shape[1] - tail, ids.shape[1]):
                out[row, p, ord(_oracle_next(BYTES.detokenize(ids[row, :p + 1 - lag].tolist())))] = 1.0
        return out

    return logits


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_a_perfect_retriever_scores_one_and_one_position_late_scores_zero(task):
    grid = build_grid(task, [256, 1024], [0.0, 0.5, 1.0], 3, 0, BYTES)
    perfect = evaluate_grid(causal_oracle(), grid, batch_size=2)
    assert [r["accuracy"] for r in perfect] == [1.0] * 6
    late = evaluate_grid(causal_oracle(lag=1), grid, batch_size=2)
    assert [r["accuracy"] for r in late] == [0.0] * 6


def test_one_wrong_answer_token_makes_the_case_wrong():
    case = build_case("passkey", 200, 0.5, 0, 0, Haystacks(BYTES))
    oracle = causal_oracle()

    def one_digit_off(ids):
        out = oracle(ids)
        p = ids.shape[1] - 2  # predicts the last answer token
        wrong = (int(out[0, p].argmax()) - ord("0") + 1) % 10 + ord("0")
        out[:, p] = 0
        out[:, p, wrong] = 1
        return out

    [(correct, token_accuracy)] = score_cases(one_digit_off, [case])
    assert not correct and token_accuracy == pytest.approx(5 / 6)  # " " + 5 digits, one wrong


@pytest.fixture()
def random_checkpoint(tmp_path, megatron_single):
    """A random (untrained) tiny RNoPE-SWA model saved as a weights-only checkpoint."""
    from rnope_megatron.checkpoint.weights_only import write_weights_checkpoint
    from rnope_megatron.model.build import build_single_rank_model
    from tests.support import tiny_config

    cfg = tiny_config(vocab_size=VOCAB, window=16, max_seq_length=4096, num_layers=4, pattern="SSSG")
    model = build_single_rank_model(cfg)
    recipe = {"model": dataclasses.asdict(cfg), "data": {"tokenizer": "bytes"}, "train": {"seq_length": 64}}
    write_weights_checkpoint(cfg, model.state_dict(), tmp_path / "ckpt", recipe)
    return tmp_path / "ckpt"


def test_a_random_model_scores_near_chance(random_checkpoint):
    from rnope_megatron.eval.models import from_checkpoint

    model = from_checkpoint(random_checkpoint)
    rows = evaluate_grid(model.logits, build_grid("passkey", [128, 512], [0.0, 1.0], 6, 0, BYTES), 6)
    # chance of a 6-token exact match under a 272-way argmax is ~1e-15: 0 of 24
    assert sum(r["accuracy"] for r in rows) == 0.0
    assert max(r["token_accuracy"] for r in rows) < 0.5


def test_hf_export_evaluated_by_transformers_gives_the_checkpoints_logits(random_checkpoint, tmp_path):
    """--hf runs transformers' SmolLM3 class (an implementation nobody here wrote) on the
    export; at 4x the window its logits equal the checkpoint path's (float32, 1e-4)."""
    from rnope_megatron.convert.commands import to_hf
    from rnope_megatron.eval.models import from_checkpoint, from_hf

    to_hf(str(random_checkpoint), str(tmp_path / "hf"), dtype="fp32")
    ours, theirs = from_checkpoint(random_checkpoint), from_hf(tmp_path / "hf")
    assert theirs.description["model_type"] == "smollm3"
    case = build_case("passkey", 160, 0.5, 0, 0, Haystacks(BYTES))
    ids = torch.tensor([case.ids])
    torch.testing.assert_close(theirs.logits(ids), ours.logits(ids), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_cli_writes_json_and_heatmap(random_checkpoint, tmp_path, task):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = eval_cli(task, "--checkpoint", random_checkpoint, "--lengths", "256,1k", "--depths", "0,1",
                    "--samples", 2, "--json", out, "--png", png, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(c["length"], c["depth"], c["samples"]) for c in result["cells"]] == [
        (256, 0.0, 2), (256, 1.0, 2), (1024, 0.0, 2), (1024, 1.0, 2)]
    assert set(result["accuracy_by_length"]) == {"256", "1024"}
    assert result["model"]["trained_length"] == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1024" in proc.stdout  # the table


def test_cli_loss_on_a_data_section_writes_per_position_loss(random_checkpoint, tmp_path):
    out, png = tmp_path / "loss.json", tmp_path / "loss.png"
    data = tmp_path / "data.yaml"
    data.write_text(f"source: default\ntokenizer: bytes\nretrieval_fraction: 0.5\ncache_dir: {tmp_path / 'cache'}\n")
    proc = eval_cli("loss", "--checkpoint", random_checkpoint, "--data", data, "--length", 300, "--samples", 2,
                    "--json", out, "--png", png)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tokens"] == 2 * 299 and result["length"] == 300
    bins = result["per_position"]
    assert bins[0]["start"] == 0 and bins[-1]["end"] == 299
    assert all(a["end"] == b["start"] for a, b in zip(bins, bins[1:]))
    # the overall loss is the position-weighted mean of the bins
    weighted = sum(b["loss"] * (b["end"] - b["start"]) for b in bins) / 299
    assert result["loss"] == pytest.approx(weighted, rel=1e-9)
    assert result["loss_beyond_trained_length"] > 0  # trained at 64 tokens
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, fragments", [
    (["passkey", "--lengths", "1x"], ["--lengths", "'1x'"]),
    (["passkey", "--lengths", "1k", "--depths", "1.5"], ["--depths", "1.5"]),
    (["passkey", "--lengths", "20"], ["--lengths", "[20]", "too short"]),
    (["passkey", "--lengths", "1k", "--png", "/nonexistent/x.png"], ["--png", "/nonexistent"]),
    (["loss", "--length", "100"], ["--input-ids", "--data"]),
])
def test_cli_failures_are_one_line(random_checkpoint, args, fragments):
    args = args[:1] + ["--checkpoint", str(random_checkpoint)] + args[1:]
    assert_one_line_error(eval_cli(*args), "rnope-eval", *fragments)


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(eval_cli("passkey", "--checkpoint", tmp_path / "nope", "--lengths", "1k"), "rnope-eval",
                          str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- gates

GATES = ["eval.interval=2", "eval.lengths=[256,512]", "eval.depths=[0,1]", "eval.samples=2",
         "eval.tasks=[passkey,niah]"]


def test_eval_gates_leave_training_bit_exact_also_through_kill_and_resume(tmp_path, data_cache):
    """Run A: no gates. Run B: gates every 2 iterations, killed with SIGKILL after step 5
    and resumed. B's losses and final state digest equal A's (the gate changes nothing),
    and every gate iteration is logged once with an accuracy per task and length."""
    common = [f"data.cache_dir={data_cache}", "train.iters=10", "checkpoint.interval=2", "train.state_digest=true",
              "logging.interval=5"]
    plain = tmp_path / "plain"
    train(plain, *common)
    gated = tmp_path / "gated"
    proc = train(gated, *common, *GATES, check=False, env={"RNOPE_FAULT": "kill@after_step:5"})
    assert proc.returncode == -signal.SIGKILL
    out = train(gated, *common, *GATES)
    assert "resumed from" in out.stdout
    records = metrics(gated)
    assert [m["iteration"] for m in records] == [2, 4, 5, 6, 8, 10]
    for record in records:
        if record["iteration"] % 2 == 0:
            assert set(record["eval"]) == {"passkey", "niah"}
            assert set(record["eval"]["passkey"]) == {"256", "512"}
            assert all(0.0 <= a <= 1.0 for a in record["eval"]["niah"].values())
        else:
            assert "eval" not in record
    assert "eval        2  passkey  256:" in proc.stdout
    plain_losses = losses(plain)
    assert {i: losses(gated)[i] for i in (5, 10)} == {i: plain_losses[i] for i in (5, 10)}
    assert exit_status(gated)["state_digest"] == exit_status(plain)["state_digest"]


def test_bad_eval_section_fails_in_one_line(tmp_path):
    proc = train(tmp_path, "eval.interval=2", "eval.tasks=[ruler]", check=False)
    assert_one_line_error(proc, "rnope-train", "eval.tasks")


def test_reproduction_recipe_compares_models_of_equal_size(megatron_single):
    """recipes/reproduce-small.yaml validates for both patterns, the two models have the
    same parameter count, and its gates evaluate past the training length."""
    from rnope_megatron.model.build import build_single_rank_model
    from rnope_megatron.recipe import load_recipe

    recipe = ROOT / "recipes" / "reproduce-small.yaml"
    counts = []
    for pattern in ("SSSG", "R"):
        r = load_recipe(recipe, [f"model.pattern={pattern}"])
        counts.append(sum(p.numel() for p in build_single_rank_model(r.model, meta=True).parameters()))
    assert counts[0] == counts[1] > 0
    assert r.eval.interval > 0 and max(r.eval.lengths) >= 8 * r.train.seq_length
