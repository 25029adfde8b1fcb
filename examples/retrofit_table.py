"""The table of examples/retrofit_small.sh: passkey accuracy per length and loss per
octave of position for the RoPE model, the retrofit before and after uptraining, and
SSSG from scratch; the goal checks (retrofit >= 0.9 at 8x, in-length loss <= 1.02x R's).

    python examples/retrofit_table.py OUT_DIR --pre N --up N [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import pathlib

MODELS = {"rope": "all-RoPE (R), pretrained", "retrofit": "retrofit SSSG, before uptraining",
          "uptrained": "retrofit SSSG, uptrained", "scratch": "SSSG from scratch (same total steps)"}
TRAINED = 128


def in_length_loss(bins: list[dict]) -> float:
    """Mean loss over positions < the training length (token-weighted)."""
    total = sum((min(b["end"], TRAINED) - b["start"]) * b["loss"] for b in bins if b["start"] < TRAINED)
    return total / TRAINED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--pre", type=int, required=True)
    parser.add_argument("--up", type=int, required=True)
    parser.add_argument("--seconds", type=int)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    results = {"pretraining_steps": args.pre, "uptraining_steps": args.up, "seconds": args.seconds, "models": {}}
    for name in MODELS:
        passkey = json.loads((out / f"passkey-{name}.json").read_text())
        loss = json.loads((out / f"loss-{name}.json").read_text())
        results["models"][name] = {
            "passkey": {int(k): v for k, v in passkey["accuracy_by_length"].items()},
            "loss_per_octave": loss["per_position"], "in_length_loss": in_length_loss(loss["per_position"])}
    models = results["models"]
    up, rope = models["uptrained"], models["rope"]
    results["goal"] = {
        "uptraining_share": args.up / args.pre,
        "passkey_8x": up["passkey"].get(8 * TRAINED),
        "loss_ratio_vs_rope": up["in_length_loss"] / rope["in_length_loss"]}
    results["goal"]["met"] = bool(results["goal"]["uptraining_share"] <= 0.2 and (results["goal"]["passkey_8x"] or 0) >= 0.9
                                  and results["goal"]["loss_ratio_vs_rope"] <= 1.02)
    lengths = sorted({n for m in models.values() for n in m["passkey"]})
    octaves = [f"{b['start']}-{b['end']}" for b in rope["loss_per_octave"]]
    lines = [f"Pretraining {args.pre} steps, uptraining {args.up} ({args.up / args.pre:.0%}).", "",
             "| model | " + " | ".join(f"passkey {n} ({n // TRAINED}x)" for n in lengths) + " | loss < 128 |",
             "| --- |" + " --- |" * (len(lengths) + 1)]
    for name, label in MODELS.items():
        m = models[name]
        lines.append(f"| {label} | " + " | ".join(f"{m['passkey'].get(n, float('nan')):.2f}" for n in lengths)
                     + f" | {m['in_length_loss']:.3f} |")
    lines += ["", "| model | " + " | ".join(f"loss pos {o}" for o in octaves) + " |", "| --- |" + " --- |" * len(octaves)]
    for name, label in MODELS.items():
        lines.append(f"| {label} | " + " | ".join(f"{b['loss']:.3f}" for b in models[name]["loss_per_octave"]) + " |")
    g = results["goal"]
    lines += ["", f"Goal (<= 20% steps, passkey >= 0.9 at 8x, in-length loss <= 1.02x R): "
              f"{'met' if g['met'] else 'MISSED'} (share {g['uptraining_share']:.0%}, 8x {g['passkey_8x']}, "
              f"loss ratio {g['loss_ratio_vs_rope']:.3f})"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in MODELS.items():
        m = models[name]
        left.plot(lengths, [m["passkey"].get(n) for n in lengths], marker="o", label=label)
        right.plot([b["end"] for b in m["loss_per_octave"]], [b["loss"] for b in m["loss_per_octave"]], marker="o")
    left.set(xscale="log", xlabel="length (tokens)", ylabel="passkey accuracy", title="passkey")
    right.set(xscale="log", xlabel="position (octave end)", ylabel="loss", title="loss per position")
    for ax in (left, right):
        ax.axvline(TRAINED, color="grey", ls=":")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
