"""YAML for files people edit: the safe loader, refusing a key given twice in one mapping.

YAML libraries keep the last of two equal keys in silence, so an edit of the first would have
no effect. Used for the node's settings, ``model.yaml`` and a federated run's model file.
"""

from __future__ import annotations

from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no arbitrary objects) with :func:`_unique_mapping` for mappings."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<" merges may be overridden, by design
        key = loader.construct_object(key_node)
        try:
            seen = first.get(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
        if seen is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen.line + 1}); only one of them "
                "would take effect",
                key_node.start_mark,
            )
        first[key] = key_node.start_mark
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` for a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
