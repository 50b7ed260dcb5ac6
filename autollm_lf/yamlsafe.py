"""Reading a user's YAML file without surprises: UTF-8 text only, no key given twice, no alias bomb.

PyYAML's safe loader accepts a key given twice (the second silently wins) and expands aliases without a
bound: a 1 KB "billion laughs" file becomes 10^9 nodes as soon as anything walks it. Both are checked on
the composed node graph, before a single Python object is built.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError

MAX_NODES = 100_000  # a run config has hundreds of nodes; aliases may not multiply them past this


def load_yaml(path: Path):
    """The file's data, or a one-line UserError naming the file (and line) and what to do."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file (byte {e.start}); give a YAML file saved as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if "\0" in text:
        raise UserError(f"{path}: binary data, not YAML; give a YAML text file")
    return load_yaml_text(text, path)


def load_yaml_text(text: str, path):
    """YAML text's data (a file's or a `KEY=VALUE` override's, `path` naming it), under the same guard."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()


def _check_node(root: yaml.Node, path: Path) -> None:
    """Refuse duplicate keys and graphs whose aliases expand past MAX_NODES (or into themselves)."""
    sizes: dict[int, int] = {}
    on_stack: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_stack:
            raise UserError(f"{path}: line {node.start_mark.line + 1}: an alias refers to the node that contains "
                            f"it; write the value out")
        on_stack.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node, path)
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise UserError(f"{path}: line {node.start_mark.line + 1}: aliases expand to more than {MAX_NODES} "
                                f"values; write the config out without nested aliases")
        on_stack.discard(key)
        sizes[key] = total
        return total

    size(root)


def _no_duplicate_keys(node: yaml.MappingNode, path: Path) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise UserError(f"{path}: line {line}: key {key.value!r} is given twice (first on line {seen[key.value]}); "
                            f"keep one")
        seen[key.value] = line
