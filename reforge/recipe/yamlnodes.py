"""YAML read with line numbers: every value of a recipe keeps the line it was written on, for error messages.

`read_yaml` composes the document (``yaml.compose`` keeps a mark on every node) and turns it into `Node` objects:
plain Python scalars, dicts and lists, each with its 1-based line. Duplicate keys are an error (pyyaml itself
silently keeps the last one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reforge.errors import RecipeError, short_path


@dataclass(frozen=True)
class Node:
    """A YAML value with its line: ``value`` is a scalar, a ``dict[str, Node]`` or a ``list[Node]``."""

    value: Any
    line: int

    @property
    def kind(self) -> str:
        """``mapping``, ``list`` or the scalar's type name, for messages."""
        if isinstance(self.value, dict):
            return "mapping"
        if isinstance(self.value, list):
            return "list"
        return {type(None): "null", bool: "true/false", int: "integer", float: "number", str: "text"}.get(
            type(self.value), type(self.value).__name__
        )

    def plain(self) -> Any:
        """The value without line numbers."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def read_yaml(path: Path, text: str) -> Node:
    """The document in ``text`` (read from ``path``) as a `Node` tree.

    Raises:
        RecipeError: not valid YAML, several documents, a key that is not text, or a key given twice.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise fail(path, line, f"is not valid YAML: {e.problem or e}{context}") from e
    except yaml.YAMLError as e:
        raise fail(path, None, f"is not valid YAML: {e}") from e
    finally:
        loader.dispose()
    if root is None:
        raise fail(path, 1, "is empty; a recipe needs at least base, retriever and steps")
    return _convert(root, path, yaml.SafeLoader(""))


def _convert(node: Any, path: Path, constructor: Any) -> Node:
    import yaml

    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        merged = getattr(node, "merged_pairs", None)  # an anchored mapping met again through an alias: flat already
        if merged is None:
            own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
            constructor.flatten_mapping(node)  # `<<: *anchor` puts the anchored pairs first: defaults the rest override
            merged = node.merged_pairs = len(node.value) - own
        items: dict[str, Node] = {}
        written: set[str] = set()  # the keys of this mapping itself (not merged in)
        for index, (key_node, value_node) in enumerate(node.value):
            key = constructor.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise fail(path, key_line, f"has a key {key!r} that is not text")
            if index >= merged:
                if key in written:
                    raise fail(path, key_line, f"gives {key!r} twice (first on line {items[key].line})", key=key)
                written.add(key)
            converted = _convert(value_node, path, constructor)
            items[key] = Node(converted.value, key_line)  # a value's line is where its key is written
        return Node(items, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(item, path, constructor) for item in node.value], line)
    return Node(constructor.construct_object(node, deep=True), line)


def fail(path: Path, line: int | None, problem: str, *, key: str | None = None, hint: str | None = None) -> RecipeError:
    """A `RecipeError` whose message starts with ``recipe.yaml:LINE:``."""
    where = f"{short_path(path)}:{line}" if line else short_path(path)
    subject = f" {key}" if key else ""
    return RecipeError(f"{where}:{subject} {problem}.", hint=hint, path=path, line=line, key=key)
