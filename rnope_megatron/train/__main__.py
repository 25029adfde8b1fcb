"""``rnope-train RECIPE.yaml [section.key=value ...]`` (or ``python -m rnope_megatron.train``).

Single process on a laptop CPU, or under ``torchrun`` on many GPUs: same command.
Resumes automatically from ``checkpoint.dir/latest``; SIGTERM / SIGUSR1 (SLURM
pre-emption; also when sent to the whole process group) save a checkpoint at the end of
the current iteration and exit 0. A bad recipe, file or checkpoint ends in one line
naming it, with a non-zero exit status, before any work is lost.
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    from rnope_megatron.cli import one_line, one_line_errors, quiet_known_warnings

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    quiet_known_warnings()
    with one_line_errors("rnope-train"):
        from rnope_megatron.train.loop import run
        from rnope_megatron.train.recipe import RecipeError, load_recipe
        from rnope_megatron.train.validation import validate, validate_input_files

        try:
            recipe = load_recipe(argv[0], argv[1:])
            validate(recipe, int(os.environ.get("WORLD_SIZE", 1)))
            validate_input_files(recipe)
        except RecipeError as err:
            raise SystemExit(f"rnope-train: bad recipe: {one_line(err)}") from None

        run(recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
