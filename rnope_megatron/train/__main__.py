"""``rnope-train [--check [--gpu h100|h200|b200]] RECIPE [section.key=value ...]``
(or ``python -m rnope_megatron.train``); ``rnope-train --list-recipes``.

RECIPE is a YAML file, or the name of a recipe shipped with the package (``8b/128k``,
``tiny-cpu``; a file that exists wins). ``--list-recipes`` prints the shipped recipes with
their scale, stage and the cluster each was planned for.

Single process on a laptop CPU, or under ``torchrun`` on many GPUs: same command.
Resumes automatically from ``checkpoint.dir/latest``; SIGTERM / SIGUSR1 (SLURM
pre-emption; also when sent to the whole process group) save a checkpoint at the end of
the current iteration and exit 0. A bad recipe, file or checkpoint ends in one line
naming it, with a non-zero exit status, before any work is lost.

Under torchrun every rank validates the recipe before any process group exists; a bad
recipe is reported once, by rank 0, and the other ranks exit 1 silently (torchrun then
adds its own summary of the failed workers). ``rnope-train --check RECIPE ...`` before
launching prints it alone.

``--check``: validate the recipe and print each layer's attention and precision policy,
then exit 0 without training (no process group, no data read). ``--gpu NAME`` checks it
for that GPU instead of this machine's (an FP8 recipe needs one of the two: FP8 support
depends on the GPU architecture). The world size is taken from ``WORLD_SIZE`` when set.
"""

from __future__ import annotations

import os
import sys
import time

from rnope_megatron.common.cli import one_line, one_line_errors, quiet_known_warnings

# A console script's entry module: quiet the library notices no user can act on (Apex/TE
# missing on CPU, ...) before the imports below bring Megatron in and print them.
quiet_known_warnings()

from rnope_megatron.common import gpus  # noqa: E402
from rnope_megatron.eval.gate import refuse_gate_too_large  # noqa: E402
from rnope_megatron.model.precision import Platform, plan_precision  # noqa: E402
from rnope_megatron.recipe import RecipeError, catalog, load_recipe  # noqa: E402
from rnope_megatron.recipe.validation import validate, validate_input_files  # noqa: E402
from rnope_megatron.train.console import describe_attention  # noqa: E402
from rnope_megatron.train.loop import run  # noqa: E402
from rnope_megatron.train.wandb_run import require_wandb  # noqa: E402


def _split_options(argv: list[str]) -> tuple[bool, str | None, list[str]]:
    """(--check given, --gpu value, the remaining arguments)."""
    check, gpu, rest = False, None, []
    args = iter(argv)
    for arg in args:
        if arg == "--check":
            check = True
        elif arg == "--gpu":
            gpu = next(args, None)
            if gpu is None or gpu.startswith("-"):
                raise SystemExit("rnope-train: --gpu needs a GPU name (h100, h200, b200)")
        elif arg.startswith("--gpu="):
            gpu = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return check, gpu, rest


def _platform(gpu_name: str | None):
    """The Platform a recipe is checked for: --gpu's, else this machine's (None without CUDA)."""
    if gpu_name is not None:
        return Platform(gpus.by_name(gpu_name))
    return Platform.detect()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--list-recipes":
        with one_line_errors("rnope-train"):
            print(catalog.render(catalog.entries()), flush=True)
        return 0
    check, gpu_name, argv = _split_options(argv)
    if not argv:
        raise SystemExit("rnope-train: no recipe given (rnope-train [--check [--gpu NAME]] RECIPE.yaml ...)")
    with one_line_errors("rnope-train"):
        world = os.environ.get("WORLD_SIZE")
        try:
            recipe = load_recipe(catalog.resolve(argv[0]), argv[1:])
            if world is not None or not check:
                validate(recipe, int(world or 1))
            platform = _platform(gpu_name)
            if check and recipe.train.fp8 is not None and platform is None:
                raise RecipeError("train.fp8: FP8 support depends on the GPU and this machine has none: "
                                  "pass --gpu h100|h200|b200 to check the recipe for one")
            # Before any process group: what TE cannot run on this GPU is refused here.
            precision = plan_precision(recipe, platform)
            if recipe.logging.wandb is not None:
                require_wandb()
            refuse_gate_too_large(recipe, platform)  # not after hours of training, at the first gate
            if not check:
                validate_input_files(recipe)
        except RecipeError as err:
            if int(os.environ.get("RANK", "0")) != 0:
                # Every rank reads the same recipe and finds the same error: rank 0 says it
                # once. The others wait for torchrun to stop them when rank 0 fails (SIGTERM,
                # default action): exiting first would have torchrun stop rank 0 before it
                # printed. A minute bounds the wait should rank 0 not fail.
                time.sleep(60)
                raise SystemExit(1) from None
            raise SystemExit(f"rnope-train: bad recipe: {one_line(err)}") from None

        if check:
            where = f" for {platform.describe()}" if platform is not None else ""
            print(f"rnope-train: {argv[0]}: recipe ok{where}")
            print(describe_attention(recipe.model, recipe.train.backend, precision))
            print(precision.describe())
            return 0

        run(recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
