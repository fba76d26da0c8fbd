"""Every file the pack writes and every weights file it reads: atomic writes, and pickle-free
reading with one set of refusals.

Why one module of about 430 lines: it is the one way files are read and written (the reader of a
safetensors header, the reader of a whole weights file, the weights-only pickle loader and the
atomic writer), so the safety rules and the wording of every file fault live in one place.

A crash or a kill while writing must leave the previous file intact: every write
goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows). A write that fails because
the disk is full raises ``DiskFullError`` naming the folder; the temporary file is
removed, and one left by a killed writer is removed by the next write of that file.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickletools
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


class UserFileError(ValueError):
    """A file the user pointed us to is missing, unreadable or of the wrong kind."""


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; the message names the
    folder, says what was kept and what to do."""

    def __init__(self, message: str, folder: str | os.PathLike):
        super().__init__(errno.ENOSPC, message, str(folder))
        self.folder = Path(folder)

    def __str__(self) -> str:
        return self.strerror


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# what the writers of other libraries say: safetensors "No space left on device (os error 28)"
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC/EDQUOT in the exception chain or its
    text, or (torch.save names no cause: "unexpected pos ...") under NEARLY_FULL_BYTES left in
    ``folder``. Ask before deleting the partial file, which frees its space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def free_space_text(folder: str | os.PathLike) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2 ** 20:.1f} MiB free" if free < 2 ** 30 else f"{free / 2 ** 30:.1f} GiB free"


_STALE_TEMP_S = 60.0


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` whose writer (pid in the name) is gone, e.g. killed
    mid-write; a minute's grace for a writer on another machine sharing the folder."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        stale = path.parent / name
        try:
            if time.time() - stale.stat().st_mtime > _STALE_TEMP_S:
                stale.unlink()
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``; DiskFullError when
    the disk is full (the previous file is then unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    existed = path.exists()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            kept = f"the previous {path.name} is unchanged" if existed else "nothing was written"
            raise DiskFullError(
                f"disk full: {path} could not be written (no space left in {path.parent}; "
                f"{free_space_text(path.parent)} now); {kept} and nothing half-written is left. Free space on that "
                "disk, or choose a folder on another disk, and try again.", path.parent) from exc
        raise
    return path


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically; metadata values must be strings."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=meta))


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return atomic_write(path, _write)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (for optimizer/RNG states: tensors and plain data only)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def damaged_file_error(what: str, path: str | os.PathLike, file_kind: str, detail: str, hint: str = "") -> UserFileError:
    """The one message for a weights file that is truncated or corrupt, whoever reads it."""
    tail = f"\n{hint}" if hint else ""
    return UserFileError(f"{what} {path} is a corrupt or truncated {file_kind} ({detail}); download it again and "
                         f"compare its size with the source{tail}")


def load_torch_weights_only(path: str | os.PathLike, what: str = "checkpoint", *, mmap: bool = False):
    """Load a ``.pt/.pth/.ckpt/.bin`` file without executing pickled code (``mmap``: map the
    tensors of a zip checkpoint instead of reading them, for a look at keys and shapes).

    Raises UserFileError naming the file: "is a corrupt or truncated PyTorch checkpoint (<reason>)"
    for a truncated or corrupt file; for a pickle that needs code to load (a class
    or function it refers to), the name of that code and how to convert the file, only if
    its source is trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileError(f"{what} not found: {path}")
    from .torch_file_check import torch_file_problem

    problem = torch_file_problem(path)  # e.g. claims of data the file does not hold: before allocating
    if problem:
        raise damaged_file_error(what, path, "PyTorch checkpoint", problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        torch_reason = (str(exc).strip().splitlines() or [""])[0][:200].rstrip(".")
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        found = named.group(1) if named else _code_in_pickle(path)
        if isinstance(found, str):
            raise UserFileError(
                f"{what} {path.name} is a pickle that needs code to run to load it (it refers to {found}). "
                "This pack never runs pickled code. Only if you trust the file's source, convert it once, "
                "in a Python session: `import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{path.name}', weights_only=False), '{path.stem}.safetensors')` "
                "and choose the .safetensors file."
            ) from exc
        reason = found[0] if found else f"{type(exc).__name__}: {torch_reason}"
        raise damaged_file_error(what, path, "PyTorch checkpoint", reason) from exc


# Pickle opcodes that import or build arbitrary objects; a tensor checkpoint refers only
# to torch's rebuild functions and plain containers, which weights_only=True allows.
_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ"})
_ALLOWED_MODULES = ("torch", "collections.OrderedDict", "_codecs.encode", "numpy")


def _code_in_pickle(path: Path) -> str | tuple[str] | None:
    """Why a weights-only load failed, from the pickle's opcodes (``pickletools`` only reads
    them, never runs them): the first global outside torch that a complete pickle refers to
    (str); (why the stream is unreadable,); or None when it reads with no such global."""
    data = path.read_bytes()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not members:
                    return ("a zip archive without data.pkl",)
                data = archive.read(members[0])
    except Exception as exc:  # BadZipFile, NotImplementedError (odd zip versions), OSError, ...
        return (f"a damaged zip archive ({str(exc)[:120]})",)
    if data.startswith(b"PK\x03\x04"):
        return ("a zip archive (PyTorch's format) whose end is missing or damaged",)
    strings: list[str] = []
    code = None
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name in _CODE_OPCODES and code is None:
                name = arg.replace(" ", ".") if opcode.name in ("GLOBAL", "INST") else ".".join(strings[-2:])
                if opcode.name == "OBJ" or not name.startswith(_ALLOWED_MODULES):
                    code = name or opcode.name
    except (ValueError, EOFError) as exc:  # truncated, or not a pickle at all
        return (f"not a complete pickle ({str(exc)[:160]})",)
    return code


def file_format(path: str | os.PathLike) -> str:
    """A weights file's format from its first bytes (not its suffix): "safetensors",
    "torch-zip", "pickle", "empty" or "unknown"."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container
        return "torch-zip"
    if len(head) > 8 and head[8:9] == b"{" and head[5:8] == b"\0\0\0":
        return "safetensors"  # little-endian u64 header length, then the JSON header
    if head[:1] == b"\x80":  # pickle protocol 2+ (legacy torch.save)
        return "pickle"
    return "unknown"


def check_weights_file(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """The format of a weights file (``file_format``), or UserFileError naming the file when it is
    missing, empty or neither safetensors nor a PyTorch checkpoint."""
    path = Path(path)
    tail = f"\n{hint}" if hint else ""
    if not path.is_file():
        where = "a folder, not a file" if path.is_dir() else "no such file"
        raise UserFileError(f"{what} not found: {path} ({where}){tail}")
    kind = file_format(path)
    if kind == "empty":
        raise UserFileError(f"{what} {path} is empty (0 bytes): the download or copy did not finish; "
                            f"download it again{tail}")
    if kind == "unknown":
        with open(path, "rb") as handle:
            head = handle.read(12)
        raise UserFileError(f"{what} {path} is neither a safetensors file nor a PyTorch checkpoint (it starts "
                            f"with {head!r}): a damaged download or the wrong file{tail}")
    return kind


SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# bytes per element of the safetensors dtypes
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
                           "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}
_MAX_HEADER = 100 * 2 ** 20  # safetensors itself refuses larger headers


@dataclass(frozen=True)
class TensorInfo:
    """What a file says of one tensor, without its data: dtype (safetensors' names: "BF16",
    "F8_E4M3", ...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


@dataclass
class TensorIndex:
    """The tensors of a weights file by key (no data read) and its string metadata."""

    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_safetensors_header(path: str | os.PathLike, what: str, hint: str = "") -> TensorIndex:
    """The header of a safetensors file, checked against the file's length: a truncated download
    (tensors ending past the end of the file) or a header that does not parse is refused here,
    naming the file, before anything is allocated."""
    path = Path(path)
    size = path.stat().st_size

    def corrupt(why: str) -> UserFileError:
        return damaged_file_error(what, path, "safetensors file", why, hint)

    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= min(size - 8, _MAX_HEADER):
            raise corrupt(f"its header claims {length} bytes in a file of {size}")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"the header is not JSON: {str(exc)[:120]}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a mapping")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise corrupt(f"the entry of {key!r} is malformed")
        if end > data_size:
            raise corrupt(f"tensor {key!r} ends at byte {end} but the file holds {data_size} bytes of data")
        info = TensorInfo(dtype, shape)
        itemsize = SAFETENSORS_DTYPE_BYTES.get(dtype)
        if itemsize is not None and info.numel * itemsize != end - start:
            raise corrupt(f"tensor {key!r} of shape {list(shape)} {dtype} does not fill its {end - start} bytes")
        tensors[key] = info
    if not isinstance(metadata, dict):
        raise corrupt("its __metadata__ is not a mapping")
    return TensorIndex(path, "safetensors", tensors, {str(k): str(v) for k, v in metadata.items()})


_TORCH_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _TORCH_DTYPE_NAMES[getattr(torch, _name)] = _code


def tensor_index(path: str | os.PathLike, what: str, *, hint: str = "",
                 read_pickle: Callable[[Path, str], object] | None = None) -> TensorIndex:
    """Keys, dtypes and shapes of a weights file without reading its tensors where the format
    allows: the safetensors header, or a zip checkpoint with its tensors memory-mapped (a legacy
    pickle is read whole). Same refusals and wording as ``read_state_dict``."""
    path = Path(path)
    kind = check_weights_file(path, what, hint)
    if kind == "safetensors":
        return read_safetensors_header(path, what, hint)
    if read_pickle is not None:
        data = read_pickle(path, kind)
    else:
        data = load_torch_weights_only(path, what, mmap=kind == "torch-zip")
    tensors = _plain_state_dict(data, path, what)
    infos = {k: TensorInfo(_TORCH_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()}
    return TensorIndex(path, kind, infos, {})


def _plain_state_dict(data, path: Path, what: str) -> dict[str, torch.Tensor]:
    """A loaded checkpoint's tensors by name (``{'state_dict': ...}`` and like wrappers unwrapped)."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not data:
        raise UserFileError(f"{what} {path} holds {type(data).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(data):
        raise UserFileError(f"{what} {path} is not a plain state dict: entries "
                            f"{sorted(str(k) for k in data if k not in tensors)[:5]} are not tensors")
    return tensors


def read_weights(path: str | os.PathLike, what: str, *, hint: str = "",
                 read_pickle: Callable[[Path, str], object] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file or a weights-only torch file
    (``{'state_dict': ...}`` unwrapped; no metadata); the format is read from the first bytes, not
    the suffix. ``what`` names the file in errors (e.g. "Wan expert"), ``hint`` is appended to them
    (where to get the file), and ``read_pickle(path, kind)`` replaces the weights-only pickle
    reader. Raises UserFileError naming the file and what is wrong. Every weights file the pack
    reads whole goes through here."""
    path = Path(path)
    kind = check_weights_file(path, what, hint)
    if kind == "safetensors":
        from safetensors.torch import load_file

        index = read_safetensors_header(path, what, hint)  # truncation and size checks before allocating
        try:
            return load_file(str(path)), index.metadata
        except Exception as exc:  # SafetensorError / OSError
            raise damaged_file_error(what, path, "safetensors file", str(exc)[:200], hint) from exc
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # torch.load reads such a name as safetensors
        raise UserFileError(f"{what} {path} is a PyTorch (pickle) file, not safetensors: rename it to "
                            f"{path.stem}.pt (it is then loaded with weights_only=True) or convert it to safetensors")
    data = read_pickle(path, kind) if read_pickle else load_torch_weights_only(path, what)
    return _plain_state_dict(data, path, what), {}


def read_state_dict(path: str | os.PathLike, what: str, *, hint: str = "",
                    read_pickle: Callable[[Path, str], object] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``read_weights``."""
    return read_weights(path, what, hint=hint, read_pickle=read_pickle)[0]


def safetensors_metadata(path: str | os.PathLike, what: str) -> dict[str, str]:
    """The string metadata of a safetensors file from its header alone (no tensor read);
    UserFileError naming the file when it is not a readable safetensors file."""
    if check_weights_file(path, what) != "safetensors":
        raise UserFileError(f"{what} {path} is not a safetensors file")
    return read_safetensors_header(path, what).metadata
