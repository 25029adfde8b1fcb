"""The paper's claim at toy scale, and an evaluator nobody here wrote agreeing with ours.

recipes/reproduce-small.yaml trains RNoPE-SWA (SSSG) and the all-global RoPE baseline (R)
on the passkey mix for 1000 steps each through the installed rnope-train, side by side
(~3.5 min on 2 cores, the longest file of the suite: it has a file of its own so that a
parallel run starts it first beside the other files). The two tests share the two trained runs.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.trainer import ROOT, console_script, eval_cli, metrics


@pytest.fixture(scope="module")
def reproduction_runs(tmp_path_factory, data_cache):
    """Seed 1 of recipes/reproduce-small.yaml as examples/reproduce_paper_small.sh trains
    it (the installed rnope-train, the recipe as is), for both patterns: {pattern: run dir}.
    The two trainings run side by side, each on its share of the cores (a model this small
    gains little from a second thread: two runs at once take less time than one after the
    other)."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, min(cores // 2, int(os.environ.get("OMP_NUM_THREADS", cores))))
    runs, procs = {}, {}
    try:
        for pattern in ("SSSG", "R"):
            runs[pattern] = tmp_path_factory.mktemp(f"repro-{pattern}")
            procs[pattern] = subprocess.Popen(
                [console_script("rnope-train"), str(ROOT / "recipes" / "reproduce-small.yaml"), f"model.pattern={pattern}",
                 "checkpoint.interval=1000", "eval.interval=1000", "eval.samples=4",
                 f"logging.run_dir={runs[pattern]}", f"data.cache_dir={data_cache}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        for pattern, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=1500)
            assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    finally:
        for proc in procs.values():  # a failed or timed-out run leaves no process behind
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return runs


def test_reproduction_recipe_shows_the_paper_claim(reproduction_runs):
    """The paper's claim at toy scale: RNoPE-SWA retrieves the passkey at the training
    length and at 8x it; the all-global RoPE baseline, same data and parameter count, does
    not at 8x. (The full script, 3 seeds: 1.00 for RNoPE-SWA at 1x-16x, RoPE 1.00 at 1x
    and <= 0.02 beyond; docs/evaluation.md. A 700-step run, with its own case set and schedule, gave
    RNoPE-SWA only 0.33 at 8x: the margin is the recipe's, not a law.)"""
    accuracy = {}
    for pattern, run in reproduction_runs.items():
        gated = [m for m in metrics(run) if "eval" in m]
        assert [m["iteration"] for m in gated] == [1000]
        accuracy[pattern] = {int(n): a for n, a in gated[0]["eval"]["passkey"].items()}
    assert accuracy["SSSG"][128] >= 0.75 and accuracy["SSSG"][1024] >= 0.75, accuracy
    assert accuracy["R"][1024] <= 0.25, accuracy


def test_lm_eval_harness_agrees_with_rnope_eval_on_an_export(reproduction_runs, tmp_path):
    """lm-evaluation-harness (an evaluator nobody here wrote) scores the HF exports of the
    two reproduction models on rnope-eval's own cases (rnope-eval lm-eval-tasks, offline)
    with the same accuracy per length as rnope-eval --hf: the byte tokenizer exported as
    tokenizer.json reads the prompts as training did, and both scorers ask for the same
    greedy answer."""
    tasks = tmp_path / "tasks"
    grid = ("--lengths", "128,1k", "--depths", "0,0.5,1", "--samples", "2")
    for pattern, run in reproduction_runs.items():
        hf = tmp_path / f"hf-{pattern}"
        convert = subprocess.run([console_script("rnope-convert"), "to-hf", str(run / "checkpoints"), str(hf),
                                  "--arch", "smollm3"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert convert.returncode == 0, convert.stderr[-2000:]
        # the same tasks for both models: the second run replaces the first's files (--force)
        made = eval_cli("lm-eval-tasks", "--out", tasks, "--tokenizer", hf / "tokenizer.json", *grid, "--force")
        assert made.returncode == 0 and "rnope_passkey" in made.stdout, made.stderr[-2000:]
        ours = eval_cli("passkey", "--hf", hf, *grid, "--json", tmp_path / f"ours-{pattern}.json", "--quiet")
        assert ours.returncode == 0, ours.stderr[-2000:]
        expected = json.loads((tmp_path / f"ours-{pattern}.json").read_text())["accuracy_by_length"]
        out = tmp_path / f"harness-{pattern}"
        harness = subprocess.run(
            [console_script("lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
             "--tasks", "rnope_passkey", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
             "--output_path", str(out)],
            capture_output=True, text=True, cwd=tmp_path, timeout=900,
            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        assert harness.returncode == 0, harness.stdout[-2000:] + harness.stderr[-3000:]
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
        got = {str(n): results[f"rnope_passkey_{n}"]["exact_match,none"] for n in (128, 1024)}
        assert got == pytest.approx({k: float(v) for k, v in expected.items()}), (pattern, got, expected)
    assert got["1024"] <= 0.25  # the RoPE baseline (last in the loop) fails at 8x under the harness too
