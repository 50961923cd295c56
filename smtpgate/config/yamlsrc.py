"""YAML in, located values out. The only module of smtpgate that imports ``yaml``.

Mappings and sequences come back as ``LocatedDict`` / ``LocatedList``: plain ``dict`` /
``list`` that also remember the file and the (1-based) line and column of every value, so
that any later check can say ``policies/x.yaml:4:14: rules[0].greylist.delay: ...``.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from ..errors import ConfigError, Problem

Mark = tuple[int, int]
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"


class Located:
    """Where a mapping or sequence came from: ``source`` (the file as given), its own
    ``line``/``col``, and ``marks``: key or index -> (line, col) of that value."""

    source: str
    line: int
    col: int
    marks: dict[Any, Mark]

    def where(self, key: Any = None) -> Mark:
        """(line, col) of the value at ``key``, or of this node itself."""
        return self.marks.get(key, (self.line, self.col)) if key is not None else (self.line, self.col)


class LocatedDict(dict, Located):
    """A mapping; ``key_marks`` holds the position of each key itself (for "unknown key")."""

    key_marks: dict[Any, Mark]

    def where(self, key: Any = None, *, at_key: bool = False) -> Mark:
        if at_key and key in self.key_marks:
            return self.key_marks[key]
        return super().where(key)


class LocatedList(list, Located):
    pass


def empty_mapping(source: str) -> LocatedDict:
    """What an empty file stands for: a mapping with no keys, at line 1."""
    out = LocatedDict()
    out.source, out.line, out.col, out.marks, out.key_marks = source, 1, 1, {}, {}
    return out


def _mark(node: yaml.Node) -> Mark:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _problem(source: str, node: yaml.Node, message: str) -> Problem:
    return Problem(source, *_mark(node), message)


class _Builder:
    """Turns a composed node tree into located containers and constructed scalars."""

    def __init__(self, loader: yaml.SafeLoader, source: str):
        self.loader, self.source = loader, source
        self.built: dict[int, Any] = {}  # aliases share one object, so "billion laughs" stays small
        self.building: set[int] = set()

    def build(self, node: yaml.Node) -> Any:
        if id(node) in self.built:
            return self.built[id(node)]
        if id(node) in self.building:
            raise ConfigError(_problem(self.source, node, "an alias refers to the node that contains it"))
        if isinstance(node, ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            raise ConfigError(_problem(self.source, node, f"unsupported YAML tag {node.tag}"))
        self.building.add(id(node))
        out = self._mapping(node) if isinstance(node, MappingNode) else self._sequence(node)
        self.building.discard(id(node))
        self.built[id(node)] = out
        return out

    def _located(self, out: Located, node: yaml.Node) -> None:
        out.source = self.source
        out.line, out.col = _mark(node)
        out.marks = {}

    def _sequence(self, node: SequenceNode) -> LocatedList:
        out = LocatedList()
        self._located(out, node)
        for i, item in enumerate(node.value):
            out.append(self.build(item))
            out.marks[i] = _mark(item)
        return out

    def _mapping(self, node: MappingNode) -> LocatedDict:
        out = LocatedDict()
        self._located(out, node)
        out.key_marks = {}
        # Duplicates are checked among the keys written here; "<<" merges may be overridden.
        seen: set = set()
        for knode, _ in node.value:
            if knode.tag == _MERGE_TAG:
                continue
            key = self._key(knode)
            if key in seen:
                raise ConfigError(_problem(self.source, knode, f"duplicate key {key!r}"))
            seen.add(key)
        self.loader.flatten_mapping(node)
        for knode, vnode in node.value:
            key = self._key(knode)
            out[key] = self.build(vnode)
            out.marks[key], out.key_marks[key] = _mark(vnode), _mark(knode)
        return out

    def _key(self, knode: yaml.Node) -> Any:
        if not isinstance(knode, ScalarNode):
            raise ConfigError(_problem(self.source, knode, "a key must be a plain value, not a list or mapping"))
        return self.loader.construct_object(knode)


def load_string(text: str | bytes, source: str) -> Any:
    """Parse one YAML document; ``source`` names it in every message. Empty -> None."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _Builder(loader, source).build(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context.startswith("while"):  # "while parsing a flow sequence"
            at = f" at line {e.context_mark.line + 1}" if e.context_mark and e.context_mark != mark else ""
            message = f"{message} ({e.context}{at})"
        elif e.context and e.problem:  # "expected a single document", "but found another document"
            message = f"{e.context}, {message}"
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError(Problem(source, line, col, message)) from None
    except yaml.YAMLError as e:  # reader errors (bad encoding) carry no mark
        raise ConfigError(Problem(source, None, None, str(e).replace("\n", " "))) from None
    except RecursionError:  # a "<<" merge of a mapping into itself
        raise ConfigError(Problem(source, None, None, "nested too deeply (a recursive alias?)")) from None
    finally:
        loader.dispose()


def load_file(path: str) -> Any:
    """Parse the YAML file at ``path``; every message names it as given."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(Problem(path, None, None, f"cannot read: {e.strerror or e}")) from None
    return load_string(data, path)


def join_path(base: str, key: Any) -> str:
    """``("rules", 1)`` -> ``rules[1]``; ``("rules[1]", "greylist")`` -> ``rules[1].greylist``."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{base}[{key}]"
    return f"{base}.{key}" if base else str(key)


def problem_at(node: Located, key: Any, path: str, message: str, *, at_key: bool = False) -> Problem:
    """A Problem at the value under ``key`` of ``node`` (or the key itself, or ``node`` when
    ``key`` is None), reading ``path: message``."""
    if isinstance(node, LocatedDict):
        line, col = node.where(key, at_key=at_key)
    else:
        line, col = node.where(key)
    return Problem(node.source, line, col, f"{path}: {message}" if path else message)


def unknown_key(node: LocatedDict, key: Any, path: str, known: Iterable[str]) -> Problem:
    """``path: unknown key (did you mean "port"?)`` at the key itself."""
    known = list(known)
    close = difflib.get_close_matches(str(key), known, 1)
    hint = f'did you mean "{close[0]}"?' if close else f"known: {', '.join(known)}"
    return problem_at(node, key, path, f"unknown key ({hint})", at_key=True)


def to_plain(value: Any, _memo: dict[int, Any] | None = None) -> Any:
    """Located containers -> plain dict/list, recursively (shared aliases stay shared)."""
    if not isinstance(value, (dict, list)):
        return value
    memo = {} if _memo is None else _memo
    if id(value) in memo:
        return memo[id(value)]
    out: Any = {} if isinstance(value, dict) else []
    memo[id(value)] = out
    if isinstance(value, dict):
        out.update((k, to_plain(v, memo)) for k, v in value.items())
    else:
        out.extend(to_plain(v, memo) for v in value)
    return out
