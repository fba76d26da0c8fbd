"""What a PyTorch checkpoint claims, checked against what the file holds before ``torch.load``.

``torch.load`` allocates each storage at the size its pickle claims (the legacy, non-zip
format before reading a byte of it) and inflates zip members to their declared size, so a
damaged or crafted file of a few bytes can claim terabytes. Here the pickle is first read with
``pickletools`` (every counted length against the bytes present), then with an unpickler that
runs nothing (every class or function it names is an inert stand-in; every storage is only a
record of its claim), and the claims are compared with the zip records or the file length.
Written by hand: neither torch nor the standard library checks this before allocating.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import ClassVar

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy format
_LEGACY_PICKLES = 5  # magic, protocol version, system info, the objects, the storage keys


class _Inert:
    """Stands for whatever the pickle names; accepts every construction step, runs nothing.
    Each subclass is one name of the pickle; its ``calls`` list records what it was called with."""

    name = ""
    calls: ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        self.calls.append((self.name, args))

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Storage:
    """A storage the pickle claims: its key and size in bytes, the bytes of its element type."""

    def __init__(self, key: str, nbytes: int, itemsize: int):
        self.key, self.nbytes, self.itemsize = key, nbytes, itemsize


class _ClaimsReader(pickle.Unpickler):
    """Reads a pickle without running any of it: records the storages it claims and the calls
    it makes (to inert stand-ins)."""

    def __init__(self, data: bytes, fields: int):
        super().__init__(io.BytesIO(data))
        self.fields = fields  # length of a storage id: 5 in the zip format, 6 in the legacy one
        self.storages: dict[str, _Storage] = {}
        self.calls: list[tuple[str, tuple]] = []
        self._classes: dict[str, type] = {}

    def find_class(self, module, name):
        key = f"{module}.{name}"
        if key not in self._classes:
            self._classes[key] = type("Inert", (_Inert,), {"name": str(name), "calls": self.calls})
        return self._classes[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= self.fields and pid[0] in ("storage", b"storage")):
            return _Inert.__new__(_Inert)
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        itemsize = _itemsize(getattr(storage_type, "name", ""))
        if itemsize is None or not isinstance(numel, int):
            return _Inert.__new__(_Inert)
        storage = _Storage(key, numel * itemsize, itemsize)
        if key not in self.storages or self.storages[key].nbytes < storage.nbytes:
            self.storages[key] = storage
        return storage


def _itemsize(name: str) -> int | None:
    """Bytes per element of a storage class (``FloatStorage``) or dtype (``float8_e4m3fn``) name."""
    if name == "UntypedStorage":
        return 1
    found = getattr(torch, name, None) if name and not name.startswith("_") else None
    if name.endswith("Storage") and found is not None:
        with warnings.catch_warnings():  # torch.FloatStorage.dtype: "TypedStorage is deprecated"
            warnings.simplefilter("ignore")
            found = getattr(found, "dtype", None)
    return found.itemsize if isinstance(found, torch.dtype) else None


_REBUILDS = {"_rebuild_tensor": None, "_rebuild_tensor_v2": None, "_rebuild_tensor_v3": 6}  # -> index of dtype


def _read_claims(data: bytes, fields: int) -> _ClaimsReader | None:
    """The claims of a pickle; None when it does not read without its real classes (then
    ``torch.load`` gives its own error)."""
    reader = _ClaimsReader(data, fields)
    try:
        reader.load()
    except Exception:  # a damaged pickle: torch.load reports it
        return None
    return reader


def _views_outside_storage(reader: _ClaimsReader) -> str | None:
    """The first tensor whose offset, shape and strides reach past its storage (``torch.load``
    would grow the storage to fit: an allocation the file does not back)."""
    for name, args in reader.calls:
        if name not in _REBUILDS or len(args) < 4 or not isinstance(args[0], _Storage):
            continue
        storage, offset, size, stride = args[:4]
        ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
        if ints is None or len(size) != len(stride) or not all(isinstance(i, int) for i in ints):
            continue
        dtype_at = _REBUILDS[name]
        itemsize = storage.itemsize
        if dtype_at is not None:
            itemsize = _itemsize(getattr(args[dtype_at], "name", "")) if len(args) > dtype_at else None
        if itemsize is None or min(ints) < 0 or 0 in size:
            continue
        end = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
        if end * itemsize > storage.nbytes:
            return (f"a tensor of shape {list(size)} (strides {list(stride)}, offset {offset}) needs {end * itemsize} "
                    f"bytes of its storage {storage.key}, which holds {storage.nbytes}")
    return None


def _complete_pickles(stream, count: int) -> str | None:
    """Read ``count`` pickles' opcodes (nothing is built); the reason when one is incomplete."""
    for _ in range(count):
        try:
            for _op in pickletools.genops(stream):
                pass
        except (ValueError, EOFError) as exc:
            return f"its pickle is incomplete or damaged ({str(exc)[:160]})"
    return None


def torch_file_problem(path: str | Path) -> str | None:
    """Why a PyTorch checkpoint cannot be loaded safely (a zip that does not open, an incomplete
    pickle, claims of data the file does not hold), or None: then ``torch.load`` may read it
    (and reports any other damage itself). Callers phrase the refusal, naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        return _zip_problem(path, size)
    with open(path, "rb") as handle:  # torch.load reads anything else as a (legacy) pickle
        objects, reason = _legacy_objects(_Bounded(handle, size))
    if reason or not objects:
        return reason
    claims = _read_claims(objects, 6)
    if claims is None:
        return None
    claimed = sum(storage.nbytes for storage in claims.storages.values())
    if claimed > size:
        return f"its pickle claims {claimed} bytes of tensor data, more than the whole file ({size} bytes)"
    return _views_outside_storage(claims)


def _zip_problem(path: Path, size: int) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                if info.file_size > size:
                    return (f"its zip member {info.filename} claims {info.file_size} bytes, more than the whole "
                            f"file ({size} bytes)")
            pickles = [i for i in infos if i.filename.endswith("data.pkl")]
            if not pickles:
                return "a zip archive without data.pkl"
            data = archive.read(pickles[0])
    except Exception as exc:  # BadZipFile, NotImplementedError (odd versions), OSError, EOFError, ...
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return f"its zip archive is damaged ({detail})"
    reason = _complete_pickles(io.BytesIO(data), 1)
    if reason:
        return reason
    claims = _read_claims(data, 5)
    if claims is None:
        return None
    records = {i.filename: i.file_size for i in infos}
    prefix = pickles[0].filename[: -len("data.pkl")]
    for key, storage in claims.storages.items():
        held = records.get(f"{prefix}data/{key}")
        if held is None:
            return f"its pickle names the storage data/{key}, which the archive does not hold"
        if held != storage.nbytes:
            return f"storage data/{key} claims {storage.nbytes} bytes but the archive holds {held}"
    return _views_outside_storage(claims)


class _Bounded:
    """A file read for ``pickletools``: no read asks for more than the file has left (a counted
    length of 2**63 in a damaged pickle would otherwise be allocated by ``read`` first)."""

    def __init__(self, handle, size: int):
        self.handle, self.size = handle, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.handle.tell())
        return self.handle.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.handle.readline(max(0, self.size - self.handle.tell()))

    def tell(self) -> int:
        return self.handle.tell()

    def seek(self, pos: int) -> int:
        return self.handle.seek(pos)


def _legacy_objects(handle) -> tuple[bytes | None, str | None]:
    """(the objects pickle of torch's legacy format, None) or (None, why the pickles do not
    read); (None, None) for a pickle that is not that format (``torch.load`` reports it)."""
    longs = []
    try:  # the magic number pickle: PROTO, LONG1, STOP (torch.load reads this first pickle whole)
        for op, arg, _ in pickletools.genops(handle):
            if op.name == "LONG1" and len(longs) < 2:
                longs.append(arg)
    except (ValueError, EOFError) as exc:
        return None, f"its pickle is incomplete or damaged ({str(exc)[:160]})"
    if longs != [LEGACY_MAGIC]:
        return None, None
    bounds = []
    for _ in range(_LEGACY_PICKLES - 1):
        start = handle.tell()
        reason = _complete_pickles(handle, 1)
        if reason:
            return None, reason
        bounds.append((start, handle.tell()))
    start, end = bounds[2]  # after the protocol version and the system info
    handle.seek(start)
    return handle.read(end - start), None
