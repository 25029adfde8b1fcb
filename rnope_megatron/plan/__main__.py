"""``rnope-plan RECIPE [section.key=value ...] [--nodes N] [--gpus-per-node G]
[--gpu h100|h200|b200] [--achieved-tflops X] [--json]``; ``rnope-plan --list-recipes``

Checks a recipe with the trainer's own rules for a cluster (the recipe's ``cluster``
section, or the options) and prints the layer map per pipeline rank, memory per GPU by
component, FLOPs per token, step time and the speed-up over the all-global RoPE
baseline. Exit status 0 when the layout fits, 3 when it does not fit, 1 on a bad recipe
or option (one line naming the field). ``--run-dir`` prints the run directory after the
trainer's checks for the world size (what examples/slurm/train.sbatch needs). RECIPE is a
file or the name of a shipped recipe (``8b/128k``; ``--list-recipes`` lists them)."""

from __future__ import annotations

import argparse
import json
import sys

from rnope_megatron.common.cli import finish_console_imports, one_line, one_line_errors, start_console_imports

# A console script's entry module: quiet the library notices no user can act on (Apex/TE
# missing on CPU, ...) before the imports below bring Megatron in and print them, and
# keep the garbage collector out of those imports (common/cli.py).
start_console_imports()

from rnope_megatron.plan.core import make_plan  # noqa: E402
from rnope_megatron.plan.report import render  # noqa: E402
from rnope_megatron.plan.core import resolve_cluster  # noqa: E402
from rnope_megatron.recipe import RecipeError, catalog, load_recipe  # noqa: E402
from rnope_megatron.recipe.validation import validate  # noqa: E402
finish_console_imports()

NOT_FITTING = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnope-plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="a YAML file, or a shipped recipe's name (8b/128k)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as rnope-train takes them")
    parser.add_argument("--nodes", type=int, help="nodes (default: the recipe's cluster.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: cluster.gpus_per_node)")
    parser.add_argument("--gpu", help="h100, h200 or b200 (default: cluster.gpu)")
    parser.add_argument("--achieved-tflops", type=float,
                        help="sustained TFLOP/s per GPU for the step time (default: 40%% of the bf16 peak)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list-recipes", action="store_true",
                        help="list the shipped recipes (scale, stage, cluster) and exit")
    parser.add_argument("--run-dir", action="store_true",
                        help="check the recipe with the trainer's rules for this world size and print its run "
                             "directory only (for job scripts; no memory check)")
    return parser


def _print_run_dir(recipe, args) -> int:
    nodes, gpus_per_node, _ = resolve_cluster(recipe, args.nodes, args.gpus_per_node, args.gpu)
    validate(recipe, world_size=nodes * gpus_per_node)
    print(recipe.run_dir, flush=True)
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # overrides may follow options
    if args.list_recipes:
        with one_line_errors("rnope-plan"):
            print(catalog.render(catalog.entries()), flush=True)
        return 0
    if args.recipe is None:
        parser.error("the following arguments are required: recipe (a file or a shipped name; --list-recipes)")
    with one_line_errors("rnope-plan"):
        try:
            path = catalog.resolve(args.recipe)
            recipe = load_recipe(path, args.overrides)
            if args.run_dir:
                return _print_run_dir(recipe, args)
            plan = make_plan(recipe, path, args.nodes, args.gpus_per_node, args.gpu, args.achieved_tflops)
        except RecipeError as err:  # the trainer's words, as rnope-train prints them
            raise SystemExit(f"rnope-plan: bad recipe: {one_line(err)}") from None
        print(json.dumps(plan) if args.json else render(plan), flush=True)
    return 0 if plan["fits"] else NOT_FITTING


if __name__ == "__main__":
    raise SystemExit(main())
