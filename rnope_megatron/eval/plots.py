"""PNG figures of ``rnope-eval`` results (matplotlib, from the ``dev`` extra)."""

from __future__ import annotations

import pathlib

from rnope_megatron.common.errors import MissingDependency
from rnope_megatron.common.output import atomic_file, check_file_target


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on clusters
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("--png needs matplotlib (pip install matplotlib)") from None
    return plt


def _save(fig, path) -> None:
    check_file_target(path, "--png")
    with atomic_file(path, "--png") as partial:  # a full disk leaves no cut or empty PNG
        fig.savefig(partial, dpi=120, bbox_inches="tight", format=pathlib.Path(path).suffix[1:] or "png")


def heatmap(rows: list[dict], title: str, path) -> None:
    """Accuracy per (depth, length) cell, as needle-in-a-haystack papers draw it."""
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
    grid = [[cell[(n, d)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def loss_curve(positions: list[int], losses: list[float], trained_length, title: str, path) -> None:
    """Mean loss per position bin; a vertical line at the training length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(positions, losses, marker=".")
    if trained_length:
        ax.axvline(trained_length, color="grey", linestyle="--", label=f"training length {trained_length}")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def accuracy_lines(series: dict[str, dict[int, float]], title: str, path, trained_length=None) -> None:
    """Accuracy vs length, one line per model (the reproduction's side-by-side plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    if trained_length:
        ax.axvline(trained_length, color="grey", linestyle="--", label=f"training length {trained_length}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey exact-match accuracy")
    ax.legend(loc="center right")  # the lines hug 0 and 1: the middle is free
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)
