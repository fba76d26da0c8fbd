"""Fuzzing the LoRA reader and the reward reader on the bytes of small real files.

Run by tests/test_faults_reader_fuzz.py in a subprocess (a segfault or a hang then fails the test
instead of killing pytest); by hand, from the pack root, for a longer, random search:

    .venv/bin/python -m tests.helpers.fuzz_readers --out /tmp/fuzz --examples 20000 --random

Seeds: a canonical LoRA and a PEFT/diffusers LoRA (safetensors), a LoRA as a torch zip, a
reward state dict as safetensors, torch zip and legacy (non-zip) pickle, and a whole pickled
module (the restricted reader's input). Mutations: truncations, bit flips, byte overwrites,
appended bytes, and structured ones: safetensors header fields (dtype, shape, data_offsets,
header length, metadata), integers / globals / strings inside the pickles, zip records cut
or dropped.

Every outcome must be a refusal (UserFileError, whose subclasses LoraInputError and
ConfigError are the project's documented error types) naming the file, or a load whose
tensors the loader can use; never another exception, a hang (5 s per example) or an
allocation over 1 GiB (the address space is limited: the allocator error is recognised in
the exception chain, even when a reader wraps it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import re
import resource
import signal
import sys
import traceback
import warnings
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the pack root (python -m from there has it already)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from training.lora_format import LoadedLora, LoraInputError, read_lora, save_canonical_lora  # noqa: E402
from training.lora_match import match_lora  # noqa: E402
from training.lora_keys import ALPHA, DOWN, UP  # noqa: E402
from training.rewards.registry import checkpoint_kind, read_state_dict  # noqa: E402
from training.safe_io import UserFileError  # noqa: E402

EXAMPLE_SECONDS = 5
ALLOCATION_LIMIT = 1 << 30
# The tiny model the LoRAs are matched against (native module -> weight shape).
MODEL_SHAPES = {"blocks.0.self_attn.q.weight": (8, 8), "blocks.0.self_attn.q.bias": (8,),
                "blocks.0.ffn.0.weight": (16, 8), "blocks.0.ffn.0.bias": (16,)}


class Hang(BaseException):
    """An example ran past EXAMPLE_SECONDS (a BaseException: no reader's ``except Exception`` hides it)."""


class Defect(AssertionError):
    """The reader answered with something other than a refusal naming the file or a usable load."""


# ---- seed files ---------------------------------------------------------------------------

class TinyModule(torch.nn.Module):
    """A whole module pickled by class name (the official MPS file's layout, in miniature),
    with HPS's marker keys."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.conv1 = torch.nn.Conv2d(3, 4, 2, bias=False)
        self.token_embedding = torch.nn.Embedding(6, 4)
        self.text_projection = torch.nn.Parameter(torch.ones(4, 4))
        self.register_buffer("scale", torch.ones(2))


def _reward_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=gen),
            "token_embedding.weight": torch.randn(6, 4, generator=gen),
            "text_projection": torch.randn(4, 4, generator=gen),
            "logit_scale": torch.tensor(4.6)}


def write_seeds(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (seed file, reader name)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    modules = {"blocks.0.self_attn.q": (torch.randn(8, 2, generator=gen), torch.randn(2, 8, generator=gen), 2.0),
               "blocks.0.ffn.0": (torch.randn(16, 2, generator=gen), torch.randn(2, 8, generator=gen), None)}
    seeds = {}
    path = save_canonical_lora(folder / "lora_canonical.safetensors", modules, {"rank": "2", "alpha": "2"})
    seeds["lora_canonical"] = (path, "lora")
    peft = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 8, generator=gen).half(),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(8, 2, generator=gen).half()}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 4, "transformer.use_rslora": True})}
    save_file(peft, str(folder / "lora_peft.safetensors"), metadata=meta)
    seeds["lora_peft"] = (folder / "lora_peft.safetensors", "lora")
    torch.save({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": modules["blocks.0.self_attn.q"][0],
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": modules["blocks.0.self_attn.q"][1],
                "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)}, folder / "lora_zip.pt")
    seeds["lora_zip"] = (folder / "lora_zip.pt", "lora")
    state = _reward_state()
    save_file(state, str(folder / "reward.safetensors"))
    seeds["reward_safetensors"] = (folder / "reward.safetensors", "reward")
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, folder / "reward_zip.pt")
    seeds["reward_zip"] = (folder / "reward_zip.pt", "reward")
    torch.save(state, folder / "reward_legacy.pt", _use_new_zipfile_serialization=False)
    seeds["reward_legacy"] = (folder / "reward_legacy.pt", "reward")
    torch.manual_seed(2)
    torch.save(TinyModule(), folder / "reward_module.pth")
    seeds["reward_module"] = (folder / "reward_module.pth", "reward")
    return seeds


# ---- what the readers must answer -------------------------------------------------------------

def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _allocation_failure(exc: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or "can't allocate memory" in str(e) for e in _chain(exc))


def read_as_lora(path: Path) -> None:
    """What the loader node does with a file: read, match against a model, render; as the
    trainer's init LoRA also ``as_modules``."""
    lora = read_lora(path)
    assert isinstance(lora, LoadedLora)
    for parts in lora.modules.values():
        for part, key in parts.items():
            tensor = lora.tensors[key]
            if part in (UP, DOWN):
                _require(tensor.ndim >= 2 and tensor.is_floating_point() and tensor.shape[0 if part == DOWN else 1] > 0,
                         f"{key}: {tensor.dtype} {list(tensor.shape)} passed as a LoRA matrix")
            if part == ALPHA:
                _require(tensor.numel() == 1 and bool(torch.isfinite(tensor.float()).all()),
                         f"{key}: alpha {tensor.dtype} {list(tensor.shape)} passed")
    report = match_lora(lora, MODEL_SHAPES, slot="lora")
    assert isinstance(report.render(), str)
    try:
        lora.as_modules()
    except LoraInputError:
        pass


def read_as_reward(path: Path) -> None:
    """What the reward loader does before building a model: the state dict and the kind."""
    state = read_state_dict(path)
    _require(isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in state.items()), "not a dict of tensors")
    checkpoint_kind(path)


READERS = {"lora": read_as_lora, "reward": read_as_reward}


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise Defect(what)


def judge(reader: str, path: Path) -> str:
    """'loaded' or 'refused'; raises Defect (or Hang) for anything else."""
    def alarm(signum, frame):
        raise Hang(f"{reader} reader still running after {EXAMPLE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(EXAMPLE_SECONDS)
    try:
        READERS[reader](path)
        return "loaded"
    except UserFileError as exc:
        if _allocation_failure(exc):
            raise Defect(f"unbounded allocation, hidden in a refusal: {exc}") from exc
        if path.name not in str(exc):
            raise Defect(f"the refusal does not name the file {path.name}: {exc}") from exc
        return "refused"
    except (Defect, Hang):
        raise
    except Exception as exc:
        what = "unbounded allocation" if _allocation_failure(exc) else "not a clear refusal"
        raise Defect(f"{what}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- mutations ---------------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 16, 255, 256, -1, -2, 2 ** 15, 2 ** 16, 2 ** 31 - 1, -2 ** 31, 2 ** 32,
                    2 ** 40, 2 ** 53, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 + 1, -2 ** 63]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64", "XX", "", 5, None]
METADATA_KEYS = ["lora_adapter_metadata", "lora_alpha", "use_rslora", "format", "rank", "reward"]
GLOBALS = ["torch FloatStorage", "torch HalfStorage", "torch LongStorage", "torch BoolStorage", "torch ByteStorage",
           "torch DoubleStorage", "torch BFloat16Storage", "torch UntypedStorage", "torch._utils _rebuild_tensor_v2",
           "torch._utils _rebuild_parameter", "collections OrderedDict", "builtins set", "torch Size",
           "torch device", "builtins getattr", "os system", "builtins dict"]
STRINGS = ["", "0", "1", "99", "cpu", "cuda:0", "meta", "../x", "data/0", "storage", "x" * 300, "\u00e9"]


def _ints(draw):
    return draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-4, 64)))


def _generic(draw, data: bytes) -> tuple[bytes, str]:
    op = draw(st.sampled_from(["truncate", "flip", "set", "append"]))
    if op == "truncate":
        n = draw(st.integers(0, max(0, len(data) - 1)))
        return data[:n], f"truncated to {n} of {len(data)} bytes"
    buf = bytearray(data)
    if op == "append":
        extra = draw(st.binary(min_size=1, max_size=64))
        return bytes(buf) + extra, f"appended {extra!r}"
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            bit = draw(st.integers(0, 7))
            buf[pos] ^= 1 << bit
            edits.append(f"{pos}^{1 << bit}")
        else:
            value = draw(st.one_of(st.sampled_from([0, 0xFF, 0x7F, 0x80, 0x20]), st.integers(0, 255)))
            buf[pos] = value
            edits.append(f"{pos}={value}")
    return bytes(buf), f"{op} {' '.join(edits)}"


def _safetensors_header(draw, data: bytes) -> tuple[bytes, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    original = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(["dtype", "shape", "offsets", "metadata", "drop", "length"]))
        name = draw(st.sampled_from(names))
        if name not in header:  # dropped by an earlier edit
            continue
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(DTYPES))
        elif field == "shape":
            header[name]["shape"] = draw(st.one_of(
                st.lists(st.builds(lambda: 0) | st.sampled_from(INTERESTING_INTS), max_size=5),
                st.sampled_from([None, "8", [[2]], [2.5], {}])))
        elif field == "offsets":
            start, end = original[name]["data_offsets"]
            header[name]["data_offsets"] = draw(st.one_of(
                st.tuples(st.sampled_from([start, 0]), st.sampled_from(INTERESTING_INTS)).map(list),
                st.tuples(st.integers(-2, len(body) + 2), st.integers(-2, len(body) + 2)).map(list),
                st.sampled_from([[start], [start, end, end], None, [str(start), end]])))
        elif field == "metadata":
            meta = header.setdefault("__metadata__", {})
            meta[draw(st.sampled_from(METADATA_KEYS))] = draw(st.one_of(
                st.sampled_from(["", "abc", "nan", "inf", "-1", "0", "1e309", "{", "[]", '{"lora_alpha": "x"}',
                                 '{"transformer.lora_alpha": null}', '{"transformer.use_rslora": true}', 3, None]),
                st.text(max_size=20)))
        elif field == "drop":
            del header[name]
        edits.append(f"{name}.{field}")
        if field == "length":
            n_claim = draw(st.sampled_from(INTERESTING_INTS + [n - 1, n + 1, n + 8]))
            text = json.dumps(header).encode()
            return (n_claim % 2 ** 64).to_bytes(8, "little") + text + body, f"header length {n_claim}"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body, f"header {', '.join(edits)}: {text[:300]!r}"


def _pickle_ops(blob: bytes, start: int = 0) -> list[tuple[str, object, int, int]]:
    """(opcode name, argument, start, end) of the pickle beginning at ``start``."""
    ops = []
    stream = io.BytesIO(blob)
    stream.seek(start)
    previous = None
    for opcode, arg, pos in pickletools.genops(stream):
        if previous is not None:
            ops.append((*previous, pos))
        previous = (opcode.name, arg, pos)
    ops.append((*previous, stream.tell()))
    return ops


def _encode_int(value: int) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]


def _encode_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _mutate_pickle(draw, blob: bytes, starts: list[int]) -> tuple[bytes, str]:
    """Replace one integer, global or string of the pickle(s) starting at ``starts``."""
    ops = [op for s in starts for op in _pickle_ops(blob, s)]
    kind = draw(st.sampled_from(["int", "global", "str"]))
    wanted = {"int": ("BININT", "BININT1", "BININT2", "LONG1", "INT"), "global": ("GLOBAL",),
              "str": ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE")}[kind]
    candidates = [op for op in ops if op[0] in wanted]
    if not candidates:
        return _generic(draw, blob)
    name, arg, lo, hi = draw(st.sampled_from(candidates))
    if kind == "int":
        value = _ints(draw)
        new = _encode_int(value)
    elif kind == "global":
        value = draw(st.sampled_from(GLOBALS))
        new = b"c" + value.replace(" ", "\n", 1).encode() + b"\n"
    else:
        value = draw(st.sampled_from(STRINGS))
        new = _encode_str(value)
    return blob[:lo] + new + blob[hi:], f"pickle {name} {arg!r} at {lo} -> {value!r}"


def _torch_zip(draw, data: bytes) -> tuple[bytes, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    names = [n for n, _ in members]
    op = draw(st.sampled_from(["pickle", "pickle", "record", "drop"]))
    what = ""
    if op == "pickle":
        index = next(i for i, n in enumerate(names) if n.endswith("data.pkl"))
        new, what = _mutate_pickle(draw, members[index][1], [0])
        members[index] = (names[index], new)
    elif op == "record":
        records = [i for i, n in enumerate(names) if re.search(r"/data/\d+$", n)]
        index = draw(st.sampled_from(records))
        blob = members[index][1]
        cut = draw(st.integers(0, len(blob) + 16))
        members[index] = (names[index], blob[:cut] if cut <= len(blob) else blob + b"\0" * (cut - len(blob)))
        what = f"record {names[index]} {len(blob)} -> {cut} bytes"
    else:
        index = draw(st.integers(0, len(members) - 1))
        what = f"dropped {names[index]}"
        del members[index]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, blob in members:
            archive.writestr(name, blob)
    return out.getvalue(), f"zip {what}"


def _legacy(draw, data: bytes) -> tuple[bytes, str]:
    """The legacy format is five pickles (magic, protocol, sys info, objects, storage keys),
    then the raw storages; mutate one of the first four."""
    starts, pos = [], 0
    for _ in range(4):
        starts.append(pos)
        pos = _pickle_ops(data, pos)[-1][3]
    return _mutate_pickle(draw, data, starts[3:] if draw(st.booleans()) else starts)


def mutate(draw, seed: str, data: bytes) -> tuple[bytes, str]:
    structured = {"safetensors": _safetensors_header, "zip": _torch_zip, "legacy": _legacy,
                  "module": _torch_zip}
    kind = ("safetensors" if seed.endswith(("canonical", "peft", "safetensors")) else
            "legacy" if seed.endswith("legacy") else "zip")
    if draw(st.integers(0, 2)) == 0:
        return _generic(draw, data)
    return structured[kind](draw, data)


# ---- the run -----------------------------------------------------------------------------------

def limit_memory() -> None:
    """Address space: what is mapped now (torch's libraries) plus ALLOCATION_LIMIT."""
    status = Path("/proc/self/status").read_text()
    mapped = int(re.search(r"VmSize:\s+(\d+)", status).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + ALLOCATION_LIMIT, mapped + ALLOCATION_LIMIT))


def _case(out: Path, name: str, path: Path, reader: str, tally: dict):
    """One example: mutate the starting file's bytes, write them, judge the reader's answer."""
    seed_bytes = path.read_bytes()
    target = out / "cases" / f"{name}{path.suffix}"

    def case(data):
        mutated, what = mutate(data.draw, name, seed_bytes)
        target.write_bytes(mutated)
        (out / "current.txt").write_text(f"{name}: {what}\n")  # names the case if the process dies
        tally[judge(reader, target)] += 1

    return case


def run(out: Path, examples: int, randomise: bool, only: str | None) -> int:
    seeds = write_seeds(out / "seeds")
    (out / "cases").mkdir(parents=True, exist_ok=True)
    for name, (path, reader) in seeds.items():  # the unmutated files load
        if judge(reader, path) != "loaded":
            print(f"seed {name} did not load", flush=True)
            return 1
    torch.set_num_threads(1)
    limit_memory()
    counts: dict[str, dict[str, int]] = {}
    failures = []
    for name, (path, reader) in seeds.items():
        if only and only not in name:
            continue
        tally = counts.setdefault(name, {"loaded": 0, "refused": 0})
        fuzz = settings(max_examples=examples, deadline=None, database=None, derandomize=not randomise,
                        phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck),
                        report_multiple_bugs=False)(given(st.data())(_case(out, name, path, reader, tally)))
        try:
            fuzz()
        except (Defect, Hang) as exc:
            failures.append(name)
            case = out / f"failure-{name}{path.suffix}"
            (out / "cases" / f"{name}{path.suffix}").replace(case)
            print(f"FAIL {name}: {exc}\n  case: {(out / 'current.txt').read_text().strip()}\n  file: {case}",
                  flush=True)
    print("outcomes " + json.dumps(counts), flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--examples", type=int, default=200, help="examples per seed file")
    parser.add_argument("--random", action="store_true", help="a new random search (default: the same cases)")
    parser.add_argument("--only", help="only the seeds whose name contains this")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")  # torch warns about odd pickle protocols in mutated files
    return run(args.out, args.examples, args.random, args.only)


if __name__ == "__main__":
    sys.exit(main())
