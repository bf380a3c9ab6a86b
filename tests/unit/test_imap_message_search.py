"""Unit tests: MIME sections, ENVELOPE/BODYSTRUCTURE, and the SEARCH matcher."""

from __future__ import annotations

import pytest

from mailhost.imap.message import Part, split_multipart, to_wire
from mailhost.imap.search import Matcher, needs_content, parse_search
from mailhost.imap.wire import Args, BadCommand, CommandFailed
from mailhost.store.index import MessageEntry

NESTED = to_wire(
    b"From: a@example.org\nSubject: outer\nContent-Type: multipart/mixed; boundary=B1\n\n"
    b"--B1\nContent-Type: text/plain\n\nfirst part\n"
    b"--B1\nContent-Type: message/rfc822\n\n"
    b"From: inner@example.org\nSubject: inner\nContent-Type: multipart/alternative; "
    b"boundary=B2\n\n--B2\nContent-Type: text/plain\n\ninner text\n--B2\n"
    b"Content-Type: text/html\n\n<p>inner html</p>\n--B2--\n"
    b"--B1--\n")


def test_split_multipart_exact_bytes():
    body = b"pre\r\n--X\r\nA: 1\r\n\r\none\r\n--X\r\n\r\ntwo\r\n--X--\r\nepilogue"
    assert split_multipart(body, b"X") == [b"A: 1\r\n\r\none", b"\r\ntwo"]


def test_sections_of_nested_message():
    msg = Part(NESTED)
    assert msg.section([1], "", []) == b"first part"
    inner = msg.section([2], "", [])
    assert inner.startswith(b"From: inner@example.org")
    assert msg.section([2], "HEADER", []).endswith(b"boundary=B2\r\n\r\n")
    assert msg.section([2, 1], "", []) == b"inner text"
    assert msg.section([2, 2], "", []) == b"<p>inner html</p>"
    assert msg.section([2, 2], "MIME", []) == b"Content-Type: text/html\r\n\r\n"
    assert msg.section([], "HEADER.FIELDS", ["subject"]) == b"Subject: outer\r\n\r\n"
    assert b"Subject" not in msg.section([], "HEADER.FIELDS.NOT", ["subject"])
    assert msg.section([9], "", []) == b""
    assert msg.section([], "", []) == NESTED


def test_bodystructure_nested():
    out = Part(NESTED).structure()
    assert out.startswith(b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1')
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT"' in out
    assert b'"ALTERNATIVE"' in out and out.endswith(b'"MIXED" ("BOUNDARY" "B1") NIL NIL NIL)')
    assert b'"inner"' in out  # the encapsulated message's ENVELOPE
    assert Part(NESTED).structure(False).endswith(b' "MIXED")')


def test_envelope_defaults_sender_and_reply_to_to_from():
    env = Part(to_wire(b'From: "Ann, A." <ann@x.org>\nSubject: s\n\nb\n')).envelope()
    assert env == (b'(NIL "s" (("Ann, A." NIL "ann" "x.org")) (("Ann, A." NIL "ann" "x.org")) '
                   b'(("Ann, A." NIL "ann" "x.org")) NIL NIL NIL NIL NIL)')


def _entry(uid, flags="", keywords=(), base="1583150000.M1P1Q1.h,S=100,W=120"):
    return MessageEntry(uid, base.replace("Q1", f"Q{uid}"), "cur", flags, frozenset(keywords))


def _search(text, entries, msgs, recent=frozenset()):
    tree = parse_search(Args([text]))
    matcher = Matcher(tree, [e.uid for e in entries], set(recent))
    return [e.uid for e in entries if matcher.match(e, lambda e=e: Part(to_wire(msgs[e.uid])))]


MSGS = {
    1: b"From: Ann <ann@x.org>\nSubject: =?utf-8?q?caf=C3=A9?= time\n"
       b"Date: Tue, 3 Mar 2020 10:00:00 +0000\n\nlet us meet\n",
    2: b"From: ben@y.org\nSubject: report\nDate: Wed, 4 Mar 2020 23:59:00 -0500\n"
       b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
       b"R3LDvMOfZSBhdXMgQmVybGlu\n",
    3: b"From: cat@z.org\nSubject: other\n\nnothing\n",
}
ENTRIES = [_entry(1, "S"), _entry(2, "F", ["$Work"]), _entry(3, "T")]


@pytest.mark.parametrize("query,expected", [
    (b"ALL", [1, 2, 3]), (b"SEEN", [1]), (b"UNSEEN", [2, 3]), (b"FLAGGED", [2]),
    (b"DELETED", [3]), (b"UNDELETED", [1, 2]), (b"KEYWORD $Work", [2]),
    (b"UNKEYWORD $Work", [1, 3]), (b"FROM ann", [1]), (b"FROM X.ORG", [1]),
    (b'SUBJECT "caf\xc3\xa9"', [1]), (b"BODY berlin", [2]), (b"TEXT meet", [1]),
    (b"TEXT report", [2]), (b"HEADER Date \"\"", [1, 2]), (b"OR FROM ann FROM cat", [1, 3]),
    (b"NOT (FROM ann)", [2, 3]), (b"SENTON 4-Mar-2020", [2]), (b"SENTSINCE 4-Mar-2020", [2]),
    (b"SENTBEFORE 4-Mar-2020", [1]), (b"ON 2-Mar-2020", [1, 2, 3]),
    (b"BEFORE 2-Mar-2020", []), (b"SINCE 3-Mar-2020", []), (b"LARGER 119", [1, 2, 3]),
    (b"SMALLER 120", []), (b"2:*", [2, 3]), (b"UID 1,3", [1, 3]), (b"RECENT", [2]),
    (b"NEW", [2]), (b"OLD", [1, 3]), (b'CHARSET UTF-8 SUBJECT "caf\xc3\xa9"', [1]),
    (b"FLAGGED UNSEEN FROM ben", [2]),
])
def test_search_keys(query, expected):
    assert _search(query, ENTRIES, MSGS, recent={2}) == expected


def test_search_errors_and_needs():
    for bad in (b"", b"FOO", b"OR SEEN", b"FROM", b"BEFORE 1-Bad-2020", b"LARGER x", b"(SEEN"):
        with pytest.raises(BadCommand):
            parse_search(Args([bad]))
    with pytest.raises(CommandFailed):
        parse_search(Args([b"CHARSET KOI8-R ALL"]))
    assert needs_content(parse_search(Args([b"SEEN UID 1:*"]))) == 0
    assert needs_content(parse_search(Args([b"SEEN FROM x"]))) == 1
    assert needs_content(parse_search(Args([b"OR SEEN BODY x"]))) == 2


def test_mime_parsing_is_bounded_in_parts_and_depth():
    from mailhost.imap.message import MAX_DEPTH, MAX_PARTS, Part

    many = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(5000))
    msg = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + many + b"--b--\r\n")
    root = Part(msg)
    assert 1 <= len(root.children) <= MAX_PARTS

    def nested(level: int) -> bytes:
        if level == 0:
            return b"Content-Type: text/plain\r\n\r\nleaf\r\n"
        return (b"Content-Type: message/rfc822\r\n\r\n" + nested(level - 1))

    part, depth = Part(nested(50)), 0
    while part.message is not None:
        part, depth = part.message, depth + 1
    assert depth == MAX_DEPTH
