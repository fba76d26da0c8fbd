"""The one file-keyed cache both nodes use: reused while the file is unchanged, read again when it
is replaced, even with the same size and mtime."""

from __future__ import annotations

import os

from training.file_cache import FileCache, file_identity


def _reader(path, reads):
    def read():
        reads.append(path.read_bytes())
        return path.read_bytes()
    return read


def test_an_unchanged_file_is_read_once(tmp_path):
    path, reads = tmp_path / "a.safetensors", []
    path.write_bytes(b"first")
    cache = FileCache(size=2)
    assert cache.get(path, _reader(path, reads)) == b"first"
    assert cache.get(path, _reader(path, reads)) == b"first"
    assert reads == [b"first"]


def test_a_file_replaced_with_the_same_size_and_mtime_is_read_again(tmp_path):
    path, reads = tmp_path / "a.safetensors", []
    path.write_bytes(b"first")
    cache = FileCache(size=2)
    cache.get(path, _reader(path, reads))
    stat = os.stat(path)
    replacement = tmp_path / "b.tmp"
    replacement.write_bytes(b"other")  # same size
    os.replace(replacement, path)  # an atomic replace: a new inode, a new ctime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime set back
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert cache.get(path, _reader(path, reads)) == b"other"
    assert reads == [b"first", b"other"]
    assert len(cache) == 1  # the older version's entry is gone


def test_options_are_separate_entries_and_the_oldest_goes_first(tmp_path):
    a, b, reads = tmp_path / "a", tmp_path / "b", []
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    cache = FileCache(size=2)
    cache.get(a, _reader(a, reads), options=("cpu",))
    cache.get(a, _reader(a, reads), options=("cuda:0",))
    assert len(reads) == 2 and len(cache) == 2
    cache.get(b, _reader(b, reads))  # evicts a on cpu, the least recently used
    cache.get(a, _reader(a, reads), options=("cuda:0",))
    assert len(reads) == 3
    cache.get(a, _reader(a, reads), options=("cpu",))
    assert len(reads) == 4


def test_a_link_and_its_target_are_one_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"x")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    assert file_identity(link) == file_identity(target)
