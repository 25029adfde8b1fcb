"""Weights & Biases beside TensorBoard (``logging.wandb``; the ``wandb`` extra).

The run logs the scalars TensorBoard gets (:func:`rnope_megatron.train.metrics.scalars`),
at the same steps, with the whole recipe as the W&B run's config. Each start of the
trainer is one W&B run: W&B refuses steps below a run's last one, and a resumed start
logs again the iterations after its checkpoint. The runs of one run directory share a
group (``logging.wandb.name``, default the run directory's name); a resumed start has
job type ``resume``. Local files go to ``WANDB_DIR`` when set, else the run directory.
"""

from __future__ import annotations

import os
import pathlib

from rnope_megatron.recipe import RecipeError
from rnope_megatron.recipe.sections import WandbSection

INSTALL = "pip install 'rnope-megatron[wandb]'"


def require_wandb() -> None:
    """Fail in one line, before any work, when ``logging.wandb`` is set without wandb."""
    try:
        import wandb  # noqa: F401  (only whether it imports)
    except ImportError:
        raise RecipeError(f"logging.wandb is set but the wandb package is not installed: {INSTALL}") from None


class WandbRun:
    """This start's W&B run (rank 0 only)."""

    def __init__(self, section: WandbSection, run_dir, config: dict, start_iteration: int):
        import wandb  # optional extra, checked by require_wandb before training starts

        run_dir = pathlib.Path(run_dir)
        name = section.name or run_dir.resolve().name
        self.run = wandb.init(
            project=section.project, name=name, group=name, mode=section.mode,
            job_type="resume" if start_iteration else "train",
            dir=os.environ.get("WANDB_DIR") or str(run_dir), config=config,
        )

    def log(self, values: dict, step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def describe(self) -> str:
        """Where the run went (the console's end-of-run line)."""
        # run.dir is the run's files/ folder; its parent is what `wandb sync` takes
        return f"{self.run.settings.mode} run {self.run.id} in {pathlib.Path(self.run.dir).parent}"

    def close(self) -> None:
        self.run.finish()
