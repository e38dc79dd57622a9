"""snapshotter/filters.py: containerd's filter syntax (github.com/containerd/containerd/filters) over
snapshot Info, as Snapshots.List / Walk apply it.

    <fieldpath>[<operator><value>]     selectors; "," = AND within one filter, several filters = OR
    fieldpath: field("."field)*, a field quoted with "..." for arbitrary label keys
    operator: == (equal, and present), != (not equal, absent counts), ~= (regular expression search)
    value: bare (no spaces or commas) or "quoted" with Go escapes; for ~= also /.../ or |...|

The cases follow containerd's own filter tests (filters/filter_test.go) where they apply, on the
snapshot adaptor: name, parent, kind (active / view / committed) and labels.<key>.
"""
from __future__ import annotations

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.filters import compile_filters, parse
from snapshotter.snapshots import Info, Kind

REF = "containerd.io/snapshot.ref"

CORPUS = [
    Info("base", "", Kind.COMMITTED, labels={"foo": "true"}),
    Info("bar", "base", Kind.COMMITTED),
    Info("foo", "base", Kind.ACTIVE, labels={"foo": "present", "more complex label": "present"}),
    Info("bar2", "bar", Kind.VIEW, labels={"bar": "true"}),
    Info("fooer", "", Kind.COMMITTED, labels={'more complex label with \\ and "': "present"}),
    Info("fooer2", "", Kind.COMMITTED, labels={'more complex label with \\ and ".post': "present"}),
    Info("baz", "bar", Kind.ACTIVE, labels={"other": "too complex, yo"}),
    Info("bazo", "bar", Kind.ACTIVE, labels={"other": "abc"}),
    Info("compound", "", Kind.COMMITTED, labels={"foo": "omg_asdf.asdf-qwer", "a.b": "dotted",
                                                  REF: "sha256:" + "ab" * 32}),
    Info("nokind", "", Kind.UNKNOWN),
]
ALL = [i.name for i in CORPUS]


def matching(*filters: str) -> list[str]:
    match = compile_filters(list(filters))
    return [i.name for i in CORPUS if match(i)]


# --------------------------------------------------------------------------- matching

@pytest.mark.parametrize("filters, expected", [
    ((), ALL),                                                # no filter: everything
    (("",), ALL),                                             # an empty filter: everything
    (("name",), ALL),                                         # present
    (("parent",), ALL),                                       # always present ("" for a base layer)
    (("labels.foo",), ["base", "foo", "compound"]),           # label present
    (("labels.foo,name",), ["base", "foo", "compound"]),
    (("labels",), []),                                        # no key: never present
    (("nosuchfield",), []),
    (("labels.foo==true",), ["base"]),
    (("labels.foo==omg_asdf.asdf-qwer",), ["compound"]),      # punctuation in a bare value
    (("name==bar",), ["bar"]),
    (("name!=bar",), [n for n in ALL if n != "bar"]),
    (("labels.foo!=true",), [n for n in ALL if n != "base"]),  # != matches where it is absent too
    (("nosuchfield!=x",), ALL),
    (("name==bar2,labels.bar",), ["bar2"]),                   # "," is AND
    (("name==bar2,labels.bar==true",), ["bar2"]),
    (("name==bar2,labels.bar==wrong",), []),
    (('labels.other=="too complex, yo"',), ["baz"]),          # a quoted value keeps commas and spaces
    (("labels.other~=[abc]+,name!=foo",), ["baz", "bazo"]),   # a search: "too complex" has a "c"
    (("labels.other~=/[abc]+/,name!=foo",), ["baz", "bazo"]),  # /.../ quoting
    (("labels.other~=|^to+ |",), ["baz"]),                    # |...| quoting keeps the space
    (("labels.other~=/[abc]{1,2}/",), ["baz", "bazo"]),       # a comma inside a quoted regexp
    (("labels.other~=^[abc]+$",), ["bazo"]),                  # anchored: the whole value
    (('labels.other~=/[abc]{0,1}"\\//,name!=foo',), []),      # valid, matches nothing
    (("name~=^ba",), ["base", "bar", "bar2", "baz", "bazo"]),
    (("name~=o$",), ["foo", "bazo"]),
    (('name==foo,labels."more complex label"',), ["foo"]),    # a quoted field
    (('labels."more complex label with \\\\ and \\""==present',), ["fooer"]),
    (('labels."more complex label with \\\\ and \\"".post==present',), ["fooer2"]),
    (("labels.a.b==dotted",), ["compound"]),                  # nested fields join into the key "a.b"
    (('labels."a.b"==dotted',), ["compound"]),
    (('labels."a".b',), ["compound"]),
    ((f'labels."{REF}"==sha256:{"ab" * 32}',), ["compound"]),
    ((f'labels."{REF}"',), ["compound"]),
    (('parent==""',), ["base", "fooer", "fooer2", "compound", "nokind"]),   # base layers
    (("parent==bar",), ["bar2", "baz", "bazo"]),
    (("kind==committed",), ["base", "bar", "fooer", "fooer2", "compound"]),
    (("kind==active",), ["foo", "baz", "bazo"]),
    (("kind==view",), ["bar2"]),
    (("kind",), [n for n in ALL if n != "nokind"]),           # an unknown kind is absent
    (('kind=="\\x61ctive"',), ["foo", "baz", "bazo"]),         # Go escapes in quoted values
    (('name=="\\u0062ar"',), ["bar"]),
    (('name=="\\142ar"',), ["bar"]),
    ((" name == bar ",), ["bar"]),                            # blanks around tokens
    (("name==bar", "name==baz"), ["bar", "baz"]),             # several filters: OR
    (("kind==view", "labels.foo==true", "name==nope"), ["base", "bar2"]),
    (("name==nope", ""), ALL),                                # an empty filter among them matches all
])
def test_matching(filters, expected):
    assert matching(*filters) == expected


def test_a_regexp_searches_and_may_be_anchored():
    assert matching("labels.foo~=asdf") == ["compound"]
    assert matching("labels.foo~=^asdf") == []
    assert matching("labels.foo~=^omg.*qwer$") == ["compound"]


def test_selectors_and_fieldpaths_are_parsed_as_written():
    sels = parse('labels."a.b".c==x,name,parent!=""')
    assert [(s.fieldpath, s.op, s.value) for s in sels] == [
        (["labels", "a.b", "c"], "==", "x"), (["name"], "present", ""), (["parent"], "!=", "")]
    assert parse("") == []


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("text, position, message", [
    ("labels.|foo|==omg_asdf.asdf-qwer", 7, "invalid quote encountered"),   # alt quotes: values of ~= only
    ('labels./foo/==x', 7, "invalid quote encountered"),
    ("name==|foo|", 6, "invalid quote encountered"),
    ("name==foo,", 10, "expected field or quoted"),                          # trailing comma
    ("labels.", 7, "expected field or quoted"),                               # trailing field separator
    ("labels..foo", 7, "expected field or quoted"),
    (",name", 0, "expected field or quoted"),
    ("image~=,id?=?fbaq", 7, "expected value or quoted"),                    # missing value
    ("name==", 6, "expected a value"),
    ("name=foo", 4, "expected an operator"),
    ("name===foo", 4, "expected an operator"),
    ("name foo", 5, "expected an operator"),
    ("name==a b", 8, "unexpected input"),                                     # a bare value ends at a blank
    ('name=="abc', 6, "not terminated"),
    ('name=="a\\qb"', 6, "unquoting failed"),                                 # not a Go escape
    ('name=="\\x4"', 6, "unquoting failed"),
    ("name~=[", 6, "bad regular expression"),
    ("name==a\0b", 7, "unexpected null"),
])
def test_syntax_errors_are_invalid_argument_with_position(text, position, message):
    with pytest.raises(InvalidArgument) as ei:
        compile_filters(["name==ok", text])
    msg = str(ei.value)
    assert msg.startswith("filters: parse error: ") and f" at {position}: " in msg and message in msg, msg


@pytest.mark.parametrize("text", ['labels.?"more complex label"==present', "name<>x", "na-me==x", "name==x;y,"])
def test_other_bad_input_is_invalid_argument(text):
    with pytest.raises(InvalidArgument, match="filters: parse error"):
        parse(text)
