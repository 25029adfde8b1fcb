"""``rnope-eval lm-eval-tasks``: the passkey / NIAH prompts of ``rnope-eval`` as an
lm-evaluation-harness task directory, so the harness (``lm_eval --model hf``) scores an
exported model on exactly the cases this package scores, offline (local JSON lines, no
hub dataset).

One task per (task, length), grouped as ``rnope_<task>``: each document is the prompt
text and its answer; the harness generates greedily for as many tokens as the answer has
(``max_gen_toks``), so its ``exact_match`` is the same event as ``rnope-eval``'s "the
greedy continuation starts with the answer" (a model trained only on answers need not
stop after one, so the generation is cut to the answer's length rather than at a stop
string).

The directory is written whole or not at all (:func:`rnope_megatron.common.output.staged_output`):
a non-empty ``--out`` is refused without ``--force``, and ``--force`` replaces only the
files a previous ``lm-eval-tasks`` wrote (its manifest lists them).
"""

from __future__ import annotations

import json
import pathlib

from rnope_megatron.eval.tasks import build_grid

TOOL = "rnope-eval lm-eval-tasks"


def write_tasks(out, task: str, lengths, depths, samples: int, seed: int, tokenizer, final=None) -> list[str]:
    """Write ``<out>/rnope_<task>_<length>.{jsonl,yaml}`` and the group ``rnope_<task>``;
    returns the task names. ``final``: where ``out`` will be moved (the task files name
    their data files there)."""
    out = pathlib.Path(out)
    final = pathlib.Path(final or out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid = build_grid(task, lengths, depths, samples, seed, tokenizer)
    names = []
    for length in lengths:
        cases = [case for (n, _), cell in grid.items() if n == length for case in cell]
        name = f"rnope_{task}_{length}"
        data = out / f"{name}.jsonl"
        with data.open("w") as f:
            for case in cases:
                f.write(json.dumps({"prompt": tokenizer.detokenize(case.ids[:case.prompt_length]),
                                    "answer": tokenizer.detokenize(case.answer), "depth": case.depth}) + "\n")
        answer_tokens = max(len(case.answer) for case in cases)
        # YAML is a superset of JSON: the task file is written as JSON, no YAML writer needed
        spec = {
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(final / data.name)}},
            "test_split": "test", "output_type": "generate_until",
            "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
            "generation_kwargs": {"until": [], "max_gen_toks": answer_tokens, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
        (out / f"{name}.yaml").write_text(json.dumps(spec, indent=2) + "\n")
        names.append(name)
    group = {"group": f"rnope_{task}", "task": names,
             "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}]}
    (out / f"rnope_{task}.yaml").write_text(json.dumps(group, indent=2) + "\n")
    return names
