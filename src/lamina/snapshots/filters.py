"""Filters for walk and list, in containerd's filter syntax.

A filter is a comma-separated list of conditions that must all hold; several
filters are alternatives, and a snapshot matches when any one of them does.
No filter at all, or an empty filter string, matches everything.

A condition is a field path, optionally followed by an operator and a value:

    name==base            equality
    kind!=committed       inequality
    labels.env~=^prod     regular expression, searched anywhere in the value
    labels."a.b/c"        presence of a field (here a label with dots in its name)

Field paths of a snapshot are `name`, `parent`, `kind` and `labels.NAME`.
A path component may be quoted with double quotes (with backslash escapes)
or backquotes. A value is a bare word or a quoted string; a regular
expression may also be written between slashes. The kind compares
case-insensitively, so `kind==active` and `kind==Active` both work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lamina.errors import InvalidArgumentError
from lamina.snapshots.types import Info

_BARE_FIELD = re.compile(r"[A-Za-z0-9_\-]+")
_OPERATORS = ("==", "!=", "~=")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "/": "/", "0": "\0"}


@dataclass(frozen=True)
class Condition:
    """One condition: a field path, an operator (None for presence) and a value."""

    path: tuple[str, ...]
    operator: str | None = None
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, info: Info) -> bool:
        found, actual = _field(info, self.path)
        if self.operator is None:
            return found
        if self.operator == "!=":
            return not found or not _equal(self.path, actual, self.value)
        if not found:
            return False
        if self.operator == "==":
            return _equal(self.path, actual, self.value)
        assert self.pattern is not None
        return self.pattern.search(actual) is not None


def _equal(path: tuple[str, ...], actual: str, expected: str) -> bool:
    if path == ("kind",):
        return actual.lower() == expected.lower()
    return actual == expected


def _field(info: Info, path: tuple[str, ...]) -> tuple[bool, str]:
    if not path:
        return False, ""
    head, rest = path[0], path[1:]
    if head == "labels":
        if not rest:
            return bool(info.labels), ""
        name = ".".join(rest)
        if name in info.labels:
            return True, info.labels[name]
        return False, ""
    if rest:
        return False, ""
    if head == "name":
        return True, info.name
    if head == "parent":
        # Always present, "" for no parent, as in containerd.
        return True, info.parent
    if head == "kind":
        return True, str(info.kind)
    return False, ""


@dataclass(frozen=True)
class Matcher:
    """A parsed set of filters: alternatives of all-of conditions."""

    alternatives: tuple[tuple[Condition, ...], ...]

    def match(self, info: Info) -> bool:
        if not self.alternatives:
            return True
        return any(all(c.match(info) for c in conditions) for conditions in self.alternatives)

    def required_label(self) -> tuple[str, str] | None:
        """Return a (name, value) label equality that every alternative requires, if any.

        The store uses it to look snapshots up by label instead of scanning.
        """
        if len(self.alternatives) != 1:
            return None
        for condition in self.alternatives[0]:
            if (
                condition.operator == "=="
                and len(condition.path) >= 2
                and condition.path[0] == "labels"
            ):
                return ".".join(condition.path[1:]), condition.value
        return None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"invalid filter {self.text!r}: {message} at position {self.pos}", subject=self.text
        )

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_spaces()
        return self.pos >= len(self.text)

    def parse(self) -> tuple[Condition, ...]:
        conditions = [self.condition()]
        while not self.at_end():
            if self.text[self.pos] != ",":
                raise self.error("expected ',' between conditions")
            self.pos += 1
            conditions.append(self.condition())
        return tuple(conditions)

    def condition(self) -> Condition:
        path = self.field_path()
        self.skip_spaces()
        operator = next((op for op in _OPERATORS if self.text.startswith(op, self.pos)), None)
        if operator is None:
            if self.pos < len(self.text) and self.text[self.pos] not in ",":
                raise self.error("expected an operator (==, != or ~=) or ','")
            return Condition(path)
        self.pos += len(operator)
        self.skip_spaces()
        value = self.value(allow_slashes=operator == "~=")
        pattern = None
        if operator == "~=":
            try:
                pattern = re.compile(value)
            except re.error as err:
                raise self.error(f"invalid regular expression {value!r} ({err})") from None
        return Condition(path, operator, value, pattern)

    def field_path(self) -> tuple[str, ...]:
        self.skip_spaces()
        parts = [self.field_component()]
        while self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            parts.append(self.field_component())
        return tuple(parts)

    def field_component(self) -> str:
        if self.pos < len(self.text) and self.text[self.pos] in '"`':
            return self.quoted(self.text[self.pos])
        found = _BARE_FIELD.match(self.text, self.pos)
        if found is None:
            raise self.error("expected a field name")
        self.pos = found.end()
        return found.group()

    def value(self, allow_slashes: bool) -> str:
        if self.pos >= len(self.text):
            raise self.error("expected a value")
        first = self.text[self.pos]
        if first in '"`' or (allow_slashes and first == "/"):
            return self.quoted(first)
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos] not in ',"`'
            and not (self.text[self.pos].isspace())
        ):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a value")
        return self.text[start : self.pos]

    def quoted(self, quote: str) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char == "\\" and quote != "`" and self.pos < len(self.text):
                escaped = self.text[self.pos]
                self.pos += 1
                if quote == "/" and escaped != "/":
                    out.append("\\" + escaped)
                elif escaped in _ESCAPES:
                    out.append(_ESCAPES[escaped])
                else:
                    raise self.error(f"unknown escape '\\{escaped}'")
                continue
            out.append(char)
        raise self.error(f"unterminated quote {quote}")


def parse_filters(filters: Sequence[str]) -> Matcher:
    """Parse filter strings into a Matcher; InvalidArgumentError if one is malformed."""
    alternatives = []
    for text in filters:
        if text == "":
            # An empty filter matches everything, as in containerd.
            return Matcher(())
        alternatives.append(_Parser(text).parse())
    return Matcher(tuple(alternatives))
