"""Maildir delivery and the per-folder UID map."""

import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailhost.store.index import UIDLIST, FolderIndex
from mailhost.store.maildir import (
    DeliveryError,
    MaildirStore,
    sizes_from_name,
    split_name,
    unique_name,
)


def test_unique_names_differ_and_escape_the_host():
    a, b = unique_name("h/o:st"), unique_name("h/o:st")
    assert a != b
    assert a.endswith(r".h\057o\072st")


def test_name_parsing():
    assert split_name("1.x,S=10,W=12:2,FS") == ("1.x,S=10,W=12", "FS")
    assert split_name("1.x") == ("1.x", "")
    assert sizes_from_name("1.x,S=10,W=12") == (10, 12)
    assert sizes_from_name("1.x") == (None, None)


@pytest_twisted.inlineCallbacks
def test_delivery_links_one_durable_file_into_every_mailbox(tmp_path):
    store = MaildirStore(tmp_path, "mx.example.org", reactor)
    writer = store.open_delivery(["a@example.org", "b@example.org", "a@example.org"])
    writer.write(b"Subject: hi\n\nline one\nline two\n")
    paths = yield writer.commit()
    assert len(paths) == 2
    for p in paths:
        assert p.parent.name == "new"
        assert p.read_bytes() == b"Subject: hi\n\nline one\nline two\n"
        assert sizes_from_name(p.name) == (31, 35)
        assert not list((p.parent.parent / "tmp").iterdir())
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino


@pytest_twisted.inlineCallbacks
def test_failed_commit_delivers_nothing(tmp_path):
    store = MaildirStore(tmp_path, "mx", reactor)
    writer = store.open_delivery(["a@example.org", "b@example.org"])
    writer.write(b"x\n")
    (tmp_path / "example.org" / "b" / "new").rmdir()  # the second link will fail
    with pytest.raises(DeliveryError):
        yield writer.commit()
    assert list((tmp_path / "example.org" / "a" / "new").iterdir()) == []
    assert list((tmp_path / "example.org" / "a" / "tmp").iterdir()) == []


def test_abort_removes_the_temp_file(tmp_path):
    store = MaildirStore(tmp_path, "mx", reactor)
    writer = store.open_delivery(["a@example.org"])
    writer.write(b"partial")
    writer.abort()
    assert list((tmp_path / "example.org" / "a" / "tmp").iterdir()) == []


def test_unsafe_mailbox_keys_are_refused(tmp_path):
    store = MaildirStore(tmp_path, "mx", reactor)
    for key in ("../x@example.org", ".hidden@example.org", "a@../etc", "a/b@example.org"):
        try:
            store.mailbox_path(key)
        except ValueError:
            continue
        raise AssertionError(key)


def _drop(folder, name, body=b"x\n"):
    (folder / "new" / name).write_bytes(body)


def test_uids_ascend_persist_and_survive_renames(tmp_path):
    folder = tmp_path / "box"
    index = FolderIndex(folder)
    validity = index.uidvalidity
    _drop(folder, "100.a,S=2,W=3")
    _drop(folder, "101.b")
    changes = index.sync()
    assert changes.added == (1, 2)
    # another Maildir tool moves a message to cur/ with flags: same UID
    os.rename(folder / "new" / "101.b", folder / "cur" / "101.b:2,S")
    changes = index.sync()
    assert changes.flags_changed == (2,) and not changes.added
    assert index.get(2).flags == "S"
    # expunge, then a new message: UID 3, never reused
    assert index.expunge([1]) == [1]
    _drop(folder, "102.c")
    assert index.sync().added == (3,)
    # a fresh process sees the same map
    again = FolderIndex(folder)
    again.sync()
    assert again.uidvalidity == validity
    assert [(e.uid, e.base) for e in again.messages()] == [(2, "101.b"), (3, "102.c")]
    assert again.uidnext == 4


def _folder_with_torn_uidlist(tmp_path):
    """One message with UID 1, then half a record, as a crash mid-append leaves it."""
    folder = tmp_path / "box"
    FolderIndex(folder)
    _drop(folder, "100.a")
    FolderIndex(folder).sync()
    with open(folder / UIDLIST, "a") as f:
        f.write("7 half-writ")
    return folder


def test_torn_last_line_is_ignored(tmp_path):
    folder = _folder_with_torn_uidlist(tmp_path)
    again = FolderIndex(folder)
    assert again.uids() == [1]


def test_flags_and_keywords_are_kept(tmp_path):
    folder = tmp_path / "box"
    index = FolderIndex(folder)
    _drop(folder, "100.a")
    index.sync()
    index.set_flags(1, "SF", ["$Label1", "bad)kw"])
    assert os.listdir(folder / "cur") == ["100.a:2,FS"]
    again = FolderIndex(folder)
    again.sync()
    entry = again.get(1)
    assert entry.flags == "FS" and entry.keywords == {"$Label1"}


def test_listeners_hear_changes(tmp_path):
    folder = tmp_path / "box"
    index = FolderIndex(folder)
    heard = []
    index.add_listener(lambda idx, changes, origin: heard.append((changes, origin)))
    _drop(folder, "100.a")
    index.sync(origin="s1")
    index.set_flags(1, "S", origin="s2")
    assert [o for _, o in heard] == ["s1", "s2"]
    assert heard[0][0].added == (1,) and heard[1][0].flags_changed == (1,)


def test_add_gives_a_uid_at_once(tmp_path):
    folder = tmp_path / "box"
    index = FolderIndex(folder)
    src = index.tmp_path()
    src.write_bytes(b"a\nb\n")
    entry = index.add(src, flags="S", keywords=["$Forwarded"], internaldate=1_000_000_000)
    assert entry.uid == 1 and entry.size == 4 and entry.wire_size == 6
    assert entry.internaldate == 1_000_000_000
    assert entry.path.exists() and entry.path.parent.name == "cur"


@pytest_twisted.inlineCallbacks
def test_small_message_touches_the_disk_only_at_commit(tmp_path):
    store = MaildirStore(tmp_path, "mx", reactor)
    writer = store.open_delivery(["a@example.org"])
    writer.write(b"Subject: small\n\nbody\n")
    tmp = tmp_path / "example.org" / "a" / "tmp"
    assert list(tmp.iterdir()) == []  # nothing created on the reactor thread
    (path,) = yield writer.commit()
    assert path.read_bytes() == b"Subject: small\n\nbody\n"


@pytest_twisted.inlineCallbacks
def test_large_message_spills_to_tmp_as_it_arrives(tmp_path):
    from mailhost.store.maildir import SPILL_SIZE

    store = MaildirStore(tmp_path, "mx", reactor)
    writer = store.open_delivery(["a@example.org"])
    line = b"x" * 999 + b"\n"
    for _ in range(SPILL_SIZE // len(line) + 2):
        writer.write(line)
    tmp = tmp_path / "example.org" / "a" / "tmp"
    assert len(list(tmp.iterdir())) == 1  # bytes went to disk, not memory
    (path,) = yield writer.commit()
    assert path.stat().st_size == writer.size
    assert list(tmp.iterdir()) == []


def test_append_after_a_torn_line_does_not_merge_records(tmp_path):
    folder = _folder_with_torn_uidlist(tmp_path)
    again = FolderIndex(folder)
    _drop(folder, "101.b")
    again.sync(force=True)
    third = FolderIndex(folder)
    assert [(e.uid, e.base) for e in third.messages()] == [(1, "100.a"), (2, "101.b")]


def test_a_delivery_in_the_same_mtime_tick_is_not_missed(tmp_path):
    folder = tmp_path / "box"
    index = FolderIndex(folder)
    _drop(folder, "100.a")
    assert index.sync().added == (1,)
    stamp = os.stat(folder / "new").st_mtime_ns
    _drop(folder, "101.b")
    os.utime(folder / "new", ns=(stamp, stamp))  # as if linked within the same tick
    time.sleep(1.1)  # the folder was fresh at the last scan: it is scanned once more
    assert index.sync().added == (2,)
    assert index.sync().added == ()
