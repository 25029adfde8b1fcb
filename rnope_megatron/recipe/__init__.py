"""Training recipes, the bottom of the package beside the model layer: the typed sections
(:mod:`.sections`), reading YAML with ``base:`` chains, section files and overrides
(:mod:`.loading`), one validator per section (:mod:`.validation`) and the recipes shipped
with the package, by name (:mod:`.catalog`). ``train``,
``plan``, ``eval`` and ``quantize`` read recipes through here; nothing here imports them."""

from rnope_megatron.recipe.loading import apply_overrides, load_recipe, read_yaml, recipe_from_dict
from rnope_megatron.recipe.sections import Recipe, RecipeError
from rnope_megatron.recipe.validation import validate

__all__ = ["Recipe", "RecipeError", "apply_overrides", "load_recipe", "read_yaml", "recipe_from_dict", "validate"]
