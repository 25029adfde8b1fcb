"""YAML from users' files, bounded: no "billion laughs".

``yaml.safe_load`` builds an alias as a reference to the anchored object, so nine nested
lists of nine aliases (a few hundred bytes) load quickly into a graph that *expands* to
9^9 items; whatever walks it afterwards as a tree (a deep copy when merging a recipe, a
dataclass built from it, printing it) runs out of memory (a campaign measured 4 GB in
55 s from 393 bytes). Here the document is composed into nodes first and its expanded
size counted (each alias counted as what it stands for, without expanding anything);
past :data:`MAX_NODES` it is refused in one line naming the file. Ordinary anchors (a
learning rate or a section reused a few times) stay well inside the bound.
"""

from __future__ import annotations

import yaml

MAX_NODES = 1_000_000
"""The most scalars, lists and mappings a document may expand to (a large recipe has ~500)."""
MAX_BYTES = 16 * 2**20
"""The largest YAML text read (recipes are a few KB)."""


class YAMLTooLarge(ValueError):
    """A document that expands past the bound (an alias bomb) or a file too large."""


def _expanded_size(node: yaml.Node, memo: dict, limit: int) -> int:
    """Nodes of the tree ``node`` stands for, aliases expanded (counted, not built): a
    node reached again through an alias counts its whole subtree again."""
    known = memo.get(id(node))
    if known is not None:
        return known
    size = 1
    stack = []
    if isinstance(node, yaml.SequenceNode):
        stack = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        stack = [part for pair in node.value for part in pair]
    for child in stack:
        size += _expanded_size(child, memo, limit)
        if size > limit:
            break  # big enough to refuse: stop counting
    memo[id(node)] = size
    return size


def load(text: str, where: str, max_nodes: int = MAX_NODES):
    """``yaml.safe_load(text)``, refusing a document that expands past ``max_nodes``
    (``where`` names the file in the message). Other YAML errors propagate as
    ``yaml.YAMLError`` for the caller to word."""
    if len(text) > MAX_BYTES:
        raise YAMLTooLarge(f"{where}: {len(text)} characters of YAML (at most {MAX_BYTES} are read)")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, max_nodes)
        if size > max_nodes:
            raise YAMLTooLarge(f"{where}: YAML aliases expand to more than {max_nodes:,} values "
                               f"(an alias bomb?): write the values out, or anchor fewer nested lists")
        return loader.construct_document(node)
    except RecursionError:  # thousands of nested lists, or an alias inside its own anchor
        raise YAMLTooLarge(f"{where}: YAML nested too deeply (or an alias refers to itself)") from None
    finally:
        loader.dispose()
