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

Launching: ``rnope-train --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint
HOST:PORT | --standalone ...] RECIPE ...`` validates the recipe for the whole world (M x N)
in this process first, and only then becomes ``torchrun`` (the same options) running
``python -m rnope_megatron.train``: a bad recipe ends in one line and no worker starts.
Started by a plain ``torchrun ... -m rnope_megatron.train``, every rank validates the
recipe before any process group exists; a bad recipe is reported once, by rank 0, and
the other ranks exit 1 silently, but torchrun then adds its own summary of the failed
workers.

``--check``: validate the recipe and print each layer's attention and precision policy,
then exit 0 without training (no process group, no data read). ``--gpu NAME`` checks it
for that GPU instead of this machine's (an FP8 recipe needs one of the two: FP8 support
depends on the GPU architecture). The world size is taken from ``WORLD_SIZE`` when set.
"""

from __future__ import annotations

import os
import sys
import time

from rnope_megatron.common.cli import finish_console_imports, one_line, one_line_errors, start_console_imports

# A console script's entry module: quiet the library notices no user can act on (Apex/TE
# missing on CPU, ...) before the imports below bring Megatron in and print them, and
# keep the garbage collector out of those imports (common/cli.py).
start_console_imports()

from rnope_megatron.common import gpus  # noqa: E402
from rnope_megatron.data.tokenizers import make_tokenizer  # noqa: E402
from rnope_megatron.eval.gate import refuse_gate_too_large  # noqa: E402
from rnope_megatron.model.precision import Platform, plan_precision  # noqa: E402
from rnope_megatron.recipe import RecipeError, catalog, load_recipe  # noqa: E402
from rnope_megatron.recipe.validation import validate, validate_input_files  # noqa: E402
from rnope_megatron.train.console import describe_attention  # noqa: E402
from rnope_megatron.train.loop import run  # noqa: E402
from rnope_megatron.train.wandb_run import require_wandb  # noqa: E402
finish_console_imports()


# torchrun's options that rnope-train passes on when it launches the workers itself
TORCHRUN_OPTIONS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint",
                    "--rdzv-id", "--master-addr", "--master-port", "--max-restarts", "--log-dir")
TORCHRUN_FLAGS = ("--standalone",)


def _split_options(argv: list[str]) -> tuple[bool, str | None, list[str], list[str]]:
    """(--check given, --gpu value, torchrun's options, the remaining arguments)."""
    check, gpu, launcher, rest = False, None, [], []
    args = iter(argv)
    for arg in args:
        name = arg.split("=", 1)[0].replace("_", "-")
        if name in TORCHRUN_FLAGS:
            launcher.append(arg)
        elif name in TORCHRUN_OPTIONS:
            if "=" in arg:
                launcher.append(arg)
            else:
                value = next(args, None)
                if value is None or value.startswith("-"):
                    raise SystemExit(f"rnope-train: {arg} needs a value")
                launcher += [arg, value]
        elif arg == "--check":
            check = True
        elif arg == "--gpu":
            gpu = next(args, None)
            if gpu is None or gpu.startswith("-"):
                raise SystemExit("rnope-train: --gpu needs a GPU name (h100, h200, b200)")
        elif arg.startswith("--gpu="):
            gpu = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return check, gpu, launcher, rest


def _option(launcher: list[str], name: str, default: str) -> str:
    """The value of torchrun option ``name`` in ``launcher`` (either spelling, ``=`` or not)."""
    for index, arg in enumerate(launcher):
        key, _, value = arg.partition("=")
        if key.replace("_", "-") == name:
            return value if value else launcher[index + 1]
    return default


def _launch_world_size(launcher: list[str]) -> int:
    """nnodes x nproc-per-node (the largest of an elastic ``MIN:MAX`` range)."""
    try:
        nproc = int(_option(launcher, "--nproc-per-node", "1"))
        nnodes = int(_option(launcher, "--nnodes", "1").split(":")[-1])
    except ValueError:
        raise SystemExit("rnope-train: --nproc-per-node and --nnodes take whole numbers (rnope-train launches "
                         "the workers itself with them; for 'gpu' or 'auto' use torchrun directly)") from None
    if nproc < 1 or nnodes < 1:
        raise SystemExit("rnope-train: --nproc-per-node and --nnodes must be >= 1")
    return nproc * nnodes


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
    check, gpu_name, launcher, argv = _split_options(argv)
    if not argv:
        raise SystemExit("rnope-train: no recipe given (rnope-train [--check [--gpu NAME]] RECIPE.yaml ...)")
    if launcher and check:
        raise SystemExit("rnope-train: --check validates without launching: drop torchrun's options")
    with one_line_errors("rnope-train"):
        world = str(_launch_world_size(launcher)) if launcher else os.environ.get("WORLD_SIZE")
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
                _check_tokenizer(recipe)
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

        if launcher:
            # Valid for the whole world: become torchrun (signals then reach it directly).
            command = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "rnope_megatron.train", *argv]
            sys.stdout.flush()
            os.execv(sys.executable, command)
        run(recipe)
    return 0


def _check_tokenizer(recipe) -> None:
    """The tokenizer loads and has an end-of-document id (every document ends with it, and
    document masking cuts at it): refused here, naming the field, not in the data build."""
    try:
        make_tokenizer(recipe.data.tokenizer)
    except (OSError, ValueError) as err:
        raise RecipeError(f"data.tokenizer: {one_line(err)}") from None


if __name__ == "__main__":
    raise SystemExit(main())
