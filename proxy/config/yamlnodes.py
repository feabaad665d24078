"""Read composed YAML nodes into values, tracking each value's path and line.

PyYAML's constructed objects forget where they came from, so a config error could not
say ``FILE:LINE``. This walks the node graph from ``yaml.compose`` instead, records
every problem rather than stopping at the first, and leaves the schema to
``config.parser``: a schema is a table of converters (``Conv``) per mapping.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy import units

T = TypeVar("T")
Conv = Callable[["NodeReader", Node, str], Any]
"""Turns the node at a path into a value, or raises ``Invalid``/``Reported``."""

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class Invalid(ValueError):
    """The node's value cannot be used; whoever catches it records the message there."""


class Reported(Exception):
    """The problems are already recorded further down; the catcher only drops the value."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def describe(value: object) -> str:
    """A value as the user wrote it in YAML, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, datetime.date):
        return f"{value.isoformat()} (YAML reads it as a date; quote it)"
    return repr(value)


def _describe_node(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    # As written, except strings, which are quoted so '' and ' x' stay visible.
    return repr(node.value) if node.tag == "tag:yaml.org,2002:str" else str(node.value)


def child(node: Node | None, key: str) -> Node | None:
    """The value node under ``key`` in a mapping node, for cross-checks that need a line."""
    if isinstance(node, MappingNode):
        for knode, vnode in node.value:
            if isinstance(knode, ScalarNode) and knode.value == key:
                return vnode  # type: ignore[no-any-return]
    return None


class NodeReader:
    """Collects ``FILE:LINE: path: message`` errors while a schema walks the nodes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._errors: list[tuple[int, str]] = []
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolve: Callable[..., str] = yaml.resolver.Resolver().resolve
        self._expanding: set[int] = set()  # mappings being expanded: guards merge cycles
        self._merged: dict[int, list[tuple[str, Node, Node]]] = {}  # no "billion laughs"

    @property
    def errors(self) -> list[str]:
        """Every error so far, in file order, each once (a merged anchor is read twice)."""
        ordered = sorted(self._errors, key=lambda e: e[0])
        return list(dict.fromkeys(text for _, text in ordered))

    def error(self, line: int, path: str, message: str) -> None:
        self._errors.append((line, f"{self.source}:{line}: {path or '(root)'}: {message}"))

    def read(self, node: Node, path: str, conv: Conv) -> Any:
        """``conv``'s value for the node, or ``MISSING`` once the failure is recorded."""
        try:
            return conv(self, node, path)
        except Invalid as exc:
            self.error(line_of(node), path, str(exc))
        except Reported:
            pass
        return MISSING

    def scalar(self, node: Node) -> object:
        """The Python value of a scalar node, typed as YAML resolves it."""
        if not isinstance(node, ScalarNode):
            raise Invalid(f"expected a single value, got {_describe_node(node)}")
        try:
            return self._constructor.construct_object(node)
        except Exception as exc:  # noqa: BLE001 - any failure of PyYAML's code on user input
            # Unmark the failed node "being built", so an alias of it fails the same way.
            self._constructor.recursive_objects.pop(node, None)
            raise Invalid(self._construct_failure(node, exc)) from None

    def _construct_failure(self, node: ScalarNode, exc: Exception) -> str:
        """Why PyYAML failed on a scalar; it raises ValueError, KeyError... not only YAMLError."""
        if isinstance(exc, yaml.YAMLError):
            return f"cannot read this value: {getattr(exc, 'problem', None) or exc}"
        kind = node.tag.rsplit(":", 1)[-1]  # "tag:yaml.org,2002:timestamp" -> "timestamp"
        detail = f" ({exc})" if isinstance(exc, ValueError) and str(exc) else ""
        implicit = self._resolve(ScalarNode, node.value, (True, False))
        hint = "; quote it if it is text" if implicit == node.tag else ""  # no explicit !!tag
        return f"cannot read {node.value!r} as a YAML {kind}{detail}{hint}"

    def items(self, node: Node) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise Invalid(f"expected a list, got {_describe_node(node)}")
        return list(node.value)

    def entries(self, node: Node, path: str) -> list[tuple[str, Node, Node]]:
        """A mapping's ``(key, key node, value node)`` in order. Duplicate keys are errors
        (PyYAML would keep the last one silently); ``<<`` merges expand, own keys win."""
        if not isinstance(node, MappingNode):
            raise Invalid(f"expected a mapping, got {_describe_node(node)}")
        self._expanding.add(id(node))
        try:
            return self._entries(node, path)
        finally:
            self._expanding.discard(id(node))

    def _entries(self, node: MappingNode, path: str) -> list[tuple[str, Node, Node]]:
        own: dict[str, tuple[Node, Node]] = {}
        merged: list[tuple[str, Node, Node]] = []
        for knode, vnode in node.value:
            if knode.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(knode, vnode, join(path, "<<")))
            elif not isinstance(knode, ScalarNode):
                self.error(line_of(knode), path, "keys must be plain strings")
            elif knode.value in own:
                first = line_of(own[knode.value][0])
                self.error(
                    line_of(knode),
                    join(path, knode.value),
                    f"duplicate key (first at line {first})",
                )
            else:
                own[knode.value] = (knode, vnode)
        result = [(key, kn, vn) for key, (kn, vn) in own.items()]
        for key, knode, vnode in merged:
            if key not in own:
                own[key] = (knode, vnode)
                result.append((key, knode, vnode))
        return result

    def _merge_sources(self, knode: Node, node: Node, path: str) -> list[tuple[str, Node, Node]]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        found: list[tuple[str, Node, Node]] = []
        for source in sources:
            if not isinstance(source, MappingNode):
                self.error(line_of(source), path, "a merge needs a mapping or a list of mappings")
                continue
            if id(source) in self._expanding:  # `&u {<<: *u}` would expand forever
                self.error(line_of(knode), path, "merge key refers to its own mapping")
                continue
            if id(source) not in self._merged:
                self._merged[id(source)] = self.entries(source, path)
            found.extend(self._merged[id(source)])
        return found


class Section:
    """One mapping read against a table of keys: unknown and missing required keys are
    errors, and each present key is converted by its entry, in table order (so a table
    can put what is referenced before what refers to it)."""

    def __init__(
        self,
        reader: NodeReader,
        node: Node,
        path: str,
        fields: Mapping[str, Conv],
        required: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.values: dict[str, Any] = {}
        self._nodes: dict[str, tuple[Node, Node]] = {}
        for key, knode, vnode in reader.entries(node, path):
            if key in fields:
                self._nodes[key] = (knode, vnode)
            else:
                expected = ", ".join(fields)
                reader.error(
                    line_of(knode),
                    join(path, key),
                    f"unknown key {key!r} (expected one of: {expected})",
                )
        for key in required:
            if key not in self._nodes:
                reader.error(line_of(node), join(path, key), "required key missing")
        for key, conv in fields.items():
            if key not in self._nodes:
                continue
            _, vnode = self._nodes[key]
            value = reader.read(vnode, join(path, key), conv)
            if value is not MISSING:
                self.values[key] = value
        self._complete = all(key in self.values for key in required)

    def node(self, key: str) -> Node | None:
        """The value node of ``key``, or None when the key is absent."""
        found = self._nodes.get(key)
        return found[1] if found else None

    def key_line(self, key: str) -> int:
        return line_of(self._nodes[key][0])

    def build(self, cls: Callable[..., T], **extra: Any) -> T:
        """The dataclass from the valid values; omitted keys take the class defaults."""
        if not self._complete:
            raise Reported
        return cls(**{**self.values, **extra})


# Converters. Each factory returns a ``Conv``; the ``as_*`` checks work on plain values.


def section(
    cls: Callable[..., Any],
    fields: Mapping[str, Conv],
    required: Sequence[str] = (),
    check: Callable[[NodeReader, Section], None] | None = None,
) -> Conv:
    """A mapping read into ``cls``; ``check`` adds cross-field rules before building."""

    def conv(reader: NodeReader, node: Node, path: str) -> Any:
        sec = Section(reader, node, path, fields, required)
        if check is not None:
            check(reader, sec)
        return sec.build(cls)

    return conv


def nullable(conv: Conv) -> Conv:
    return lambda reader, node, path: None if is_null(node) else conv(reader, node, path)


def scalar(check: Callable[[object], Any]) -> Conv:
    """A converter for one scalar; ``check`` raises ``ValueError`` with the message."""

    def conv(reader: NodeReader, node: Node, path: str) -> Any:
        try:
            return check(reader.scalar(node))
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    return conv


def list_of(item: Conv, *, min_items: int = 0) -> Conv:
    """A list converted item by item (``path[i]``) into a tuple."""

    def conv(reader: NodeReader, node: Node, path: str) -> tuple[Any, ...]:
        nodes = reader.items(node)
        if len(nodes) < min_items:
            raise Invalid(f"needs at least {min_items} item{'s' if min_items > 1 else ''}")
        values = [reader.read(n, f"{path}[{i}]", item) for i, n in enumerate(nodes)]
        if any(v is MISSING for v in values):
            raise Reported
        return tuple(values)

    return conv


def as_str(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    return value


def as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def as_int(value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected an integer, got {describe(value)}")
    if minimum is not None and value < minimum:
        raise Invalid(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise Invalid(f"must be at most {maximum}, got {value}")
    return value


def string(*, pattern: re.Pattern[str] | None = None, hint: str = "", lower: bool = False) -> Conv:
    """A non-empty string, optionally matching ``pattern`` (``hint`` says what is allowed)."""

    def check(value: object) -> str:
        text = as_str(value)
        if not text:
            raise Invalid("must not be empty")
        if pattern is not None and not pattern.fullmatch(text):
            raise Invalid(f"{hint}, got {text!r}")
        return text.lower() if lower else text

    return scalar(check)


def text() -> Conv:
    """Any string, empty allowed (a response body, for instance)."""
    return scalar(as_str)


def choice(*options: str) -> Conv:
    def check(value: object) -> str:
        if value not in options:
            raise Invalid(f"must be one of: {', '.join(options)}; got {describe(value)}")
        return str(value)

    return scalar(check)


def boolean() -> Conv:
    return scalar(as_bool)


def integer(minimum: int | None = None, maximum: int | None = None) -> Conv:
    return scalar(lambda v: as_int(v, minimum, maximum))


def number(minimum: float) -> Conv:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"expected a number, got {describe(value)}")
        if not value >= minimum:  # also refuses .nan
            raise Invalid(f"must be at least {minimum:g}, got {describe(value)}")
        return float(value)

    return scalar(check)


def _no_bool(value: object, what: str) -> object:
    # YAML reads yes/no/on/off as booleans; say so in YAML's words, not Python's.
    if isinstance(value, bool):
        raise Invalid(f"expected {what}, got {describe(value)}")
    return value


def duration(*, positive: bool = True) -> Conv:
    """Seconds from ``"250ms"``/``"10s"``/a number; ``positive`` where 0 means nothing."""

    def check(value: object) -> float:
        seconds = units.parse_duration(_no_bool(value, "a duration like '250ms' or '10s'"))
        if positive and seconds == 0:
            raise Invalid(f"must be more than 0, got {describe(value)}")
        if seconds == float("inf"):
            raise Invalid(f"must be finite, got {describe(value)}")
        return seconds

    return scalar(check)


def size(*, minimum: int = 0) -> Conv:
    def check(value: object) -> int:
        size_ = units.parse_size(_no_bool(value, "a size like '64KiB' or '10MiB'"))
        if size_ < minimum:
            raise Invalid(f"must be at least {units.format_size(minimum)}, got {describe(value)}")
        return size_

    return scalar(check)


def percent() -> Conv:
    return scalar(lambda value: units.parse_percent(_no_bool(value, "a percentage 0-100")))
