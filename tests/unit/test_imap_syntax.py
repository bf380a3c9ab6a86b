"""Unit tests: modified UTF-7, command argument parsing, sequence sets, dates, names."""

from __future__ import annotations

import pytest

from mailhost.imap import utf7
from mailhost.imap.account import list_pattern, validate_name
from mailhost.imap.fetch import parse_fetch_atts
from mailhost.imap.wire import (
    Args,
    BadCommand,
    CommandFailed,
    Literal,
    format_sequence_set,
    istring,
    parse_datetime,
    parse_sequence_set,
    select_positions,
)


@pytest.mark.parametrize("text,wire", [
    ("INBOX", "INBOX"), ("été", "&AOk-t&AOk-"), ("a&b", "a&-b"), ("日本語", "&ZeVnLIqe-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
])
def test_utf7_round_trip(text, wire):
    assert utf7.encode(text) == wire
    assert utf7.decode(wire) == text


@pytest.mark.parametrize("wire", ["&AGE-", "&AOk", "&AOk-&AOk-", "é", "&Jjo!"])
def test_utf7_rejects_non_canonical(wire):
    with pytest.raises(utf7.MailboxNameError):
        utf7.decode(wire)


@pytest.mark.parametrize("name", ["..", "a..b", ".a", "a.", "a/b", "/etc", "a\\b", "",
                                  "x&AAo-y", "&AGE-"])
def test_unsafe_names_refused(name):
    with pytest.raises(CommandFailed):
        validate_name(name)


def test_names_accepted():
    assert validate_name("inbox") == "INBOX"
    assert validate_name("Work Projects.2024") == "Work Projects.2024"


def test_list_patterns():
    assert list_pattern("", "*").match("a.b.c")
    assert list_pattern("", "%").match("a") and not list_pattern("", "%").match("a.b")
    assert list_pattern("Work.", "%").match("Work.x")
    assert list_pattern("", "inbox").match("INBOX")


def test_args_strings_and_literals():
    args = Args([b'a "quo\\"ted" atom ', Literal(3, data=b"lit"), b" end"])
    assert args.astring() == b"a"
    args.sp()
    assert args.astring() == b'quo"ted'
    args.sp()
    assert args.astring() == b"atom"
    args.sp()
    assert args.astring() == b"lit"
    args.sp()
    assert args.atom() == "end"
    args.end()


@pytest.mark.parametrize("bad", [b'"open', b'"bad\\x"', b""])
def test_args_bad_strings(bad):
    with pytest.raises(BadCommand):
        Args([bad]).astring()


def test_flag_lists():
    assert Args([b"(\\Seen $Label)"]).paren_atoms() == ["\\Seen", "$Label"]
    assert Args([b"\\Seen \\Deleted"]).flag_list() == ["\\Seen", "\\Deleted"]


def test_sequence_sets():
    assert parse_sequence_set("1:3,7,9:*") == [(1, 3), (7, 7), (9, None)]
    for bad in ("0", "1:0", "a", "1,,2", "", "4294967296"):
        with pytest.raises(BadCommand):
            parse_sequence_set(bad)
    uids = [3, 5, 9, 100]
    assert select_positions(parse_sequence_set("1:4294967295"), uids, True) == [0, 1, 2, 3]
    assert select_positions(parse_sequence_set("4:9"), uids, True) == [1, 2]
    assert select_positions(parse_sequence_set("*"), uids, True) == [3]
    assert select_positions(parse_sequence_set("2,4:*"), uids, False) == [1, 3]
    assert select_positions(parse_sequence_set("*:3"), uids, False) == [2, 3]
    assert select_positions(parse_sequence_set("7"), uids, False) == []
    assert format_sequence_set([1, 2, 3, 5, 7, 8]) == "1:3,5,7:8"


def test_strings_out():
    assert istring("plain") == b'"plain"'
    assert istring('a"b') == b'"a\\"b"'
    assert istring("line\r\nbreak") == b"{11}\r\nline\r\nbreak"
    assert istring("été") == b"{5}\r\n" + "été".encode()


def test_datetime():
    assert parse_datetime("17-Jul-1996 02:44:25 -0700") == 837596665.0
    assert parse_datetime(" 1-Jan-2000 00:00:00 +0000") == 946684800.0
    with pytest.raises(BadCommand):
        parse_datetime("32-Jul-1996 02:44:25 -0700")


def test_fetch_atts():
    items = parse_fetch_atts(Args([b"(UID BODY.PEEK[1.2.HEADER.FIELDS (From \"To\")]<0.10>)"]))
    assert items[0].name == "UID"
    item = items[1]
    assert item.numbers == (1, 2) and item.text == "HEADER.FIELDS" and item.peek
    assert item.fields == ("From", "To") and item.partial == (0, 10)
    assert item.label() == b"BODY[1.2.HEADER.FIELDS (From To)]<0>"
    assert [i.name for i in parse_fetch_atts(Args([b"FAST"]))] == \
        ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    for bad in (b"BODY[MIME]", b"BODY[0]", b"(FLAGS", b"NOPE", b"BODY[]<1.0>"):
        with pytest.raises(BadCommand):
            parse_fetch_atts(Args([bad]))


def test_list_pattern_agrees_with_a_regex_oracle():
    import itertools
    import re

    def oracle(pattern: str, name: str) -> bool:
        rx = "".join(".*" if c == "*" else "[^.]*" if c == "%" else re.escape(c)
                     for c in pattern)
        return re.fullmatch(rx, name) is not None

    names = ["", "a", "a.b", "ab", "a.b.c", "b.a", "aa.b", "x.y"]
    for n in range(1, 4):
        for combo in itertools.product("ab.*%", repeat=n):
            pattern = "".join(combo)
            for name in names:
                assert list_pattern("", pattern).match(name) == oracle(pattern, name), \
                    (pattern, name)


def test_wildcard_heavy_list_pattern_is_no_denial_of_service():
    """A backtracking regex takes minutes on this; the position-set matcher does not."""
    name = "a" * 200
    assert not list_pattern("", "*" + "a*" * 30 + "x").match(name)
    assert not list_pattern("", "%a" * 60 + "x").match(name)
    assert list_pattern("", "*a*a*a*a*a*").match(name)
