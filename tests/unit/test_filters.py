"""Walk and list filters in containerd's syntax, parsed and matched against infos."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import InvalidArgumentError
from lamina.snapshots.filters import parse_filters
from lamina.snapshots.types import Info, Kind


def info(
    name: str,
    kind: Kind = Kind.ACTIVE,
    parent: str = "",
    labels: Mapping[str, str] | None = None,
) -> Info:
    return Info(name=name, kind=kind, parent=parent, labels=labels or {})


CORPUS = [
    info("base", Kind.COMMITTED, labels={"tier": "base", "a.b/c": "dotted"}),
    info("mid", Kind.COMMITTED, parent="base", labels={"tier": "mid"}),
    info("app-1", Kind.ACTIVE, parent="mid", labels={"tier": "app", "env": "prod"}),
    info("app-2", Kind.ACTIVE, parent="mid", labels={"env": "dev, test"}),
    info("view-1", Kind.VIEW, parent="base"),
    info("scratch", Kind.ACTIVE),
]
ALL = {i.name for i in CORPUS}


def matching(*filters: str) -> set[str]:
    matcher = parse_filters(filters)
    return {i.name for i in CORPUS if matcher.match(i)}


def go_quote(text: str) -> str:
    """Quote TEXT as a double-quoted filter string, escaping only what must be."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
    )
    return f'"{escaped}"'


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param((), ALL, id="none"),
        pytest.param(("",), ALL, id="empty-string"),
        pytest.param(("name==base",), {"base"}, id="name-equal"),
        pytest.param(("name!=base",), ALL - {"base"}, id="name-not-equal"),
        pytest.param(("name~=^app-",), {"app-1", "app-2"}, id="name-regex-anchored"),
        pytest.param(("name~=pp",), {"app-1", "app-2"}, id="name-regex-searches"),
        pytest.param(("name~=/^(base|mid)$/",), {"base", "mid"}, id="regex-in-slashes"),
        pytest.param(('name~="-[0-9]$"',), {"app-1", "app-2", "view-1"}, id="regex-quoted"),
        pytest.param(("parent==mid",), {"app-1", "app-2"}, id="parent-equal"),
        pytest.param(('parent==""',), {"base", "scratch"}, id="parent-empty"),
        pytest.param(('parent!=""',), {"mid", "app-1", "app-2", "view-1"}, id="parent-set"),
        pytest.param(("kind==active",), {"app-1", "app-2", "scratch"}, id="kind-active"),
        pytest.param(("kind==view",), {"view-1"}, id="kind-view"),
        pytest.param(("kind==committed",), {"base", "mid"}, id="kind-committed"),
        pytest.param(("kind==Committed",), {"base", "mid"}, id="kind-capitalised"),
        pytest.param(("kind!=active",), {"base", "mid", "view-1"}, id="kind-not-equal"),
        pytest.param(("labels.tier",), {"base", "mid", "app-1"}, id="label-present"),
        pytest.param(("labels.tier==mid",), {"mid"}, id="label-equal"),
        pytest.param(("labels.tier!=mid",), ALL - {"mid"}, id="label-not-equal-or-absent"),
        pytest.param(("labels.tier~=^(base|app)$",), {"base", "app-1"}, id="label-regex"),
        pytest.param(('labels."a.b/c"',), {"base"}, id="quoted-label-present"),
        pytest.param(('labels."a.b/c"==dotted',), {"base"}, id="quoted-label-equal"),
        pytest.param(("labels.`a.b/c`==dotted",), {"base"}, id="backquoted-label"),
        pytest.param(('labels.env=="dev, test"',), {"app-2"}, id="quoted-value-with-comma"),
        pytest.param(("labels.missing",), set(), id="label-absent"),
        pytest.param(("labels.tier,kind==active",), {"app-1"}, id="comma-is-and"),
        pytest.param(("labels.tier==base,labels.tier==mid",), set(), id="and-exclusive"),
        pytest.param(("name==base", "name==mid"), {"base", "mid"}, id="filters-are-or"),
        pytest.param(
            ("kind==view", "labels.env==prod,parent==mid"), {"view-1", "app-1"}, id="or-of-ands"
        ),
        pytest.param(("name==nothing", "name==mid"), {"mid"}, id="or-one-empty"),
        pytest.param(("name == base",), {"base"}, id="spaces-around-operator"),
        pytest.param(("labels.tier==mid , kind==committed",), {"mid"}, id="spaces-around-comma"),
        pytest.param(("name",), ALL, id="name-present"),
        pytest.param(("unknown",), set(), id="unknown-field-absent"),
        pytest.param(("unknown==x",), set(), id="unknown-field-equal"),
    ],
)
def test_filter_matches(filters: tuple[str, ...], expected: set[str]) -> None:
    assert matching(*filters) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("name==", id="missing-value"),
        pytest.param("name==a,", id="trailing-comma"),
        pytest.param(",name==a", id="leading-comma"),
        pytest.param("name==a,,kind==view", id="double-comma"),
        pytest.param("labels.", id="empty-label-name"),
        pytest.param("==a", id="missing-field"),
        pytest.param("name=a", id="single-equals"),
        pytest.param("name<>a", id="unknown-operator"),
        pytest.param("name==a b", id="space-in-bare-value"),
        pytest.param('name=="open', id="unterminated-double-quote"),
        pytest.param('labels."open==a', id="unterminated-quoted-field"),
        pytest.param("labels.`open", id="unterminated-backquote"),
        pytest.param("name~=/open", id="unterminated-slash-regex"),
        pytest.param("name~=(", id="bad-regex"),
        pytest.param("name~=[a-", id="bad-regex-class"),
        pytest.param('name=="\\q"', id="unknown-escape"),
        pytest.param("la bels", id="space-in-field"),
    ],
)
def test_malformed_filter(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_filters([text])


def test_malformed_among_valid() -> None:
    with pytest.raises(InvalidArgumentError):
        parse_filters(["name==a", "name=="])


def test_quoted_escapes() -> None:
    labelled = info("x", labels={"quote": 'say "hi"', "path": "a\\b", "lines": "1\n2\t3"})
    assert parse_filters(['labels.quote=="say \\"hi\\""']).match(labelled)
    assert parse_filters(['labels.path=="a\\\\b"']).match(labelled)
    assert parse_filters(['labels.lines=="1\\n2\\t3"']).match(labelled)
    assert not parse_filters(['labels.lines=="1n2t3"']).match(labelled)


def test_slash_regex_escaped_slash() -> None:
    nested = info("a/b/c")
    assert parse_filters(["name~=/^a\\/b\\//"]).match(nested)
    assert not parse_filters(["name~=/^b\\//"]).match(nested)


def test_unquoted_dotted_label_path() -> None:
    # A bare dotted path names the label whose name joins the parts with dots.
    dotted = info("x", labels={"containerd.io/gc.root": "now"})
    assert parse_filters(['labels."containerd.io/gc.root"']).match(dotted)
    assert parse_filters(['labels."containerd.io/gc.root"==now']).match(dotted)
    with_dots = info("y", labels={"a.b.c": "1"})
    assert parse_filters(["labels.a.b.c==1"]).match(with_dots)


def test_label_index_hint() -> None:
    hint = parse_filters(["kind==active,labels.env==prod"]).required_label()
    assert hint == ("env", "prod")
    assert parse_filters(['labels."a.b/c"==dotted']).required_label() == ("a.b/c", "dotted")
    assert parse_filters(["labels.env==prod", "name==x"]).required_label() is None
    assert parse_filters(["labels.env!=prod"]).required_label() is None
    assert parse_filters(["labels.env"]).required_label() is None
    assert parse_filters([]).required_label() is None


label_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    min_size=1,
    max_size=40,
)


@given(name=label_text, value=label_text, other=label_text)
def test_quoted_label_round_trip(name: str, value: str, other: str) -> None:
    labelled = info("x", labels={name: value})
    field = f"labels.{go_quote(name)}"
    assert parse_filters([field]).match(labelled)
    assert parse_filters([f"{field}=={go_quote(value)}"]).match(labelled)
    assert parse_filters([f"{field}!={go_quote(value)}"]).match(labelled) is False
    if other != value:
        assert not parse_filters([f"{field}=={go_quote(other)}"]).match(labelled)
    assert parse_filters([f"{field}=={go_quote(value)}"]).required_label() == (name, value)


@given(key=label_text)
def test_quoted_name_round_trip(key: str) -> None:
    assert parse_filters([f"name=={go_quote(key)}"]).match(info(key))
    assert not parse_filters([f"name!={go_quote(key)}"]).match(info(key))
