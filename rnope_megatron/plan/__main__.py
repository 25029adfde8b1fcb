"""``rnope-plan RECIPE.yaml [section.key=value ...] [--nodes N] [--gpus-per-node G]
[--gpu h100|h200|b200] [--achieved-tflops X] [--json]``

Checks a recipe with the trainer's own rules for a cluster (the recipe's ``cluster``
section, or the options) and prints the layer map per pipeline rank, memory per GPU by
component, FLOPs per token, step time and the speed-up over the all-global RoPE
baseline. Exit status 0 when the layout fits, 3 when it does not fit, 1 on a bad recipe
or option (one line naming the field). ``--run-dir`` prints the run directory after the
trainer's checks for the world size (what examples/slurm/train.sbatch needs)."""

from __future__ import annotations

import argparse
import json
import sys

NOT_FITTING = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnope-plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as rnope-train takes them")
    parser.add_argument("--nodes", type=int, help="nodes (default: the recipe's cluster.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: cluster.gpus_per_node)")
    parser.add_argument("--gpu", help="h100, h200 or b200 (default: cluster.gpu)")
    parser.add_argument("--achieved-tflops", type=float,
                        help="sustained TFLOP/s per GPU for the step time (default: 40%% of the bf16 peak)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--run-dir", action="store_true",
                        help="check the recipe with the trainer's rules for this world size and print its run "
                             "directory only (for job scripts; no memory check)")
    return parser


def _print_run_dir(recipe, args) -> int:
    from rnope_megatron.plan.core import resolve_cluster
    from rnope_megatron.train.validation import validate

    nodes, gpus_per_node, _ = resolve_cluster(recipe, args.nodes, args.gpus_per_node, args.gpu)
    validate(recipe, world_size=nodes * gpus_per_node)
    print(recipe.run_dir, flush=True)
    return 0


def main(argv=None) -> int:
    from rnope_megatron.cli import one_line, one_line_errors, quiet_known_warnings

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()  # before megatron is imported: its import-time warnings are what a user saw
    with one_line_errors("rnope-plan"):
        from rnope_megatron.plan import make_plan, render
        from rnope_megatron.train.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(args.recipe, args.overrides)
            if args.run_dir:
                return _print_run_dir(recipe, args)
            plan = make_plan(recipe, args.recipe, args.nodes, args.gpus_per_node, args.gpu, args.achieved_tflops)
        except RecipeError as err:  # the trainer's words, as rnope-train prints them
            raise SystemExit(f"rnope-plan: bad recipe: {one_line(err)}") from None
        print(json.dumps(plan) if args.json else render(plan), flush=True)
    return 0 if plan["fits"] else NOT_FITTING


if __name__ == "__main__":
    raise SystemExit(main())
