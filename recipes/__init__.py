"""The shipped training recipes, installed as the data package ``rnope_megatron.recipes``
(``setup.py`` maps this folder there) so that ``rnope-train 8b/128k`` works from a wheel.
Only the YAML files matter; see ``rnope_megatron.recipe.catalog``."""
