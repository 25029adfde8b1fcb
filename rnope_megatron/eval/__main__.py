"""python -m rnope_megatron.eval == rnope-eval."""

from rnope_megatron.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
