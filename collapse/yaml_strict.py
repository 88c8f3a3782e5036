"""YAML loading that refuses duplicate keys.

PyYAML's `safe_load` keeps the last of two equal keys in a mapping, so a config with two `run:`
sections silently loses the first one's settings. Users' files (configs, sweeps, prompts) are
read here instead, and a duplicate is a YAML error naming the key and both lines.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode


class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key; the message names it and both lines, on one line."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose mappings reject a key they already hold."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges are not keys
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise DuplicateKeyError(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on "
                    f"line {first.line + 1}); merge the two into one"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """`yaml.safe_load(text)`, except that a duplicate mapping key raises.

    Raises:
        yaml.YAMLError: the text is not valid YAML, or a mapping repeats a key.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
