"""Side-by-side table of examples/reproduce_paper_small.sh's passkey evaluations.

    python examples/reproduce_table.py OUT_DIR [--seconds N]

Reads OUT_DIR/passkey-<model>-seed<k>.json (rnope-eval passkey --json) and writes
OUT_DIR/results.json (per model and length: mean accuracy over seeds, and per seed),
OUT_DIR/results.md (the markdown table, also printed) and OUT_DIR/results.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys

MODELS = {"rnope-swa": "RNoPE-SWA (SSSG, W=32)", "rope-baseline": "all-global RoPE (R)",
          "nope": "all-global NoPE (G)"}


def collect_loss(out: pathlib.Path) -> dict:
    """{model: rnope-eval loss --json} from OUT_DIR/loss-<model>.json (the LM half)."""
    return {path.name[len("loss-"):-len(".json")]: json.loads(path.read_text())
            for path in sorted(out.glob("loss-*.json"))}


def loss_markdown(losses: dict) -> str:
    """Loss per octave of position, one row per model; bins past the training length marked."""
    first = next(iter(losses.values()))
    trained = first.get("trained_length")
    bins = [(b["start"], b["end"]) for b in first["per_position"]]
    head = [f"{s}-{e}" + (" *" if trained and s >= trained else "") for s, e in bins]
    lines = ["| model | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(bins)]
    for name, result in losses.items():
        lines.append(f"| {MODELS.get(name, name)} | " + " | ".join(f"{b['loss']:.3f}" for b in result["per_position"])
                     + " |")
    return "\n".join(lines)


def collect(out: pathlib.Path) -> dict:
    """{model: {"per_seed": {seed: {length: acc}}, "mean": {length: acc}, "trained_length": n}}"""
    results: dict = {}
    for path in sorted(out.glob("passkey-*-seed*.json")):
        match = re.fullmatch(r"passkey-(.+)-seed(\d+)\.json", path.name)
        if not match:
            continue
        data = json.loads(path.read_text())
        entry = results.setdefault(match.group(1), {"per_seed": {}, "trained_length": None})
        entry["per_seed"][int(match.group(2))] = {int(k): v for k, v in data["accuracy_by_length"].items()}
        entry["trained_length"] = data["model"].get("trained_length")
        entry["samples_per_cell"], entry["depths"] = data["samples"], data["depths"]
    for entry in results.values():
        lengths = sorted(set.intersection(*(set(s) for s in entry["per_seed"].values())))
        entry["mean"] = {n: statistics.fmean(s[n] for s in entry["per_seed"].values()) for n in lengths}
    return results


def markdown(results: dict) -> str:
    lengths = sorted({n for entry in results.values() for n in entry["mean"]})
    trained = next((e["trained_length"] for e in results.values() if e["trained_length"]), None)
    head = [f"{n} ({n // trained}x)" if trained else str(n) for n in lengths]
    lines = ["| model | seeds | " + " | ".join(head) + " |", "| --- | --- |" + " --- |" * len(lengths)]
    for name, entry in results.items():
        seeds = len(entry["per_seed"])
        cells = []
        for n in lengths:
            values = [s[n] for s in entry["per_seed"].values()]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{entry['mean'][n]:.2f}{spread}")
        lines.append(f"| {MODELS.get(name, name)} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--seconds", type=int, default=None, help="wall time of the whole run, recorded")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    results = collect(out)
    if not results:
        print(f"{sys.argv[0]}: no passkey-*-seed*.json in {out}", file=sys.stderr)
        return 1
    table = markdown(results)
    summary = {"task": "passkey", "scoring": "exact match of the greedy answer", "wall_seconds": args.seconds,
               "models": {name: {"mean": {str(k): v for k, v in e["mean"].items()},
                                 "per_seed": {str(s): {str(k): v for k, v in acc.items()}
                                              for s, acc in e["per_seed"].items()},
                                 "trained_length": e["trained_length"], "samples_per_cell": e["samples_per_cell"],
                                 "depths": e["depths"]}
                          for name, e in results.items()}}
    losses = collect_loss(out)
    if losses:
        summary["loss_per_position"] = {name: {"trained_length": r.get("trained_length"),
                                               "per_position": r["per_position"],
                                               "loss_within_trained_length": r.get("loss_within_trained_length"),
                                               "loss_beyond_trained_length": r.get("loss_beyond_trained_length")}
                                        for name, r in losses.items()}
        table += ("\n\nNext-token loss per octave of position on the embedded corpus (models trained on "
                  "it alone; * = past the training length):\n\n" + loss_markdown(losses))
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    took = f"\n\nWall time: {args.seconds // 60} min {args.seconds % 60} s." if args.seconds else ""
    (out / "results.md").write_text(f"Passkey exact-match accuracy (mean over seeds ± std; "
                                    f"{next(iter(results.values()))['samples_per_cell']} samples per "
                                    f"length and depth).\n\n{table}{took}\n")
    from rnope_megatron.common.errors import MissingDependency

    try:
        from rnope_megatron.eval.plots import accuracy_lines

        trained = next((e["trained_length"] for e in results.values() if e["trained_length"]), None)
        accuracy_lines({MODELS.get(n, n): e["mean"] for n, e in results.items()},
                       "passkey retrieval past the training length", out / "results.png", trained)
    except MissingDependency as err:
        print(f"no plot: {err}", file=sys.stderr)
    print(table + took)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
