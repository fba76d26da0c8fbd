"""A small LRU cache of what was read from files, stale as soon as the file changes.

An entry is reused only while the file's identity is unchanged: real path, size, mtime, ctime and
inode. mtime alone is not enough: it can be set back (``os.utime``, a copy that keeps times), while
ctime changes on every write and cannot be set back, and an atomic replace gives a new inode, so a
file replaced with the same size and mtime is read again. Both nodes that keep files (the LoRA
loader, Load Reward Model) use this one rule.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


def file_identity(path: str | os.PathLike) -> tuple[str, int, int, int, int]:
    """(real path, size, mtime_ns, ctime_ns, inode): changes whenever the file's content may have."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return (real, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


class FileCache(Generic[Value]):
    """At most ``size`` values read from files, each keyed by the file's identity plus ``options``
    (e.g. the device a model is for); a file's stale entries are dropped when it is read again."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple, Value] = OrderedDict()

    def get(self, path: str | os.PathLike, read: Callable[[], Value], options: Hashable = ()) -> Value:
        identity = file_identity(path)
        key = (identity, options)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        for old in [k for k in self._entries if k[0][0] == identity[0] and k[0] != identity]:
            del self._entries[old]  # an older version of this file
        value = read()
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
