"""Sharded safetensors checkpoints read and written one tensor at a time (for checkpoints larger
than memory). safetensors' own `save_file` needs every tensor of a file in memory at once; this
writer puts the header first (offsets are known from shapes and dtypes) and then streams each
tensor's bytes, copying untouched tensors byte for byte from the source file."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import BakeError
from ..store import TensorStore, check_finite

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
CHUNK = 64 * 1024 * 1024


@dataclass
class Entry:
    file: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise BakeError(f"--model: {path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise BakeError(f"--model: {path.name} has a {n}-byte header; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise BakeError(f"--model: {path.name} has a malformed safetensors header") from None
    return header, 8 + n


def entries_of(path: Path) -> dict[str, Entry]:
    """Name → where its bytes lie, for every tensor of one safetensors file."""
    header, base = read_header(path)
    out = {}
    for key, h in header.items():
        if key != "__metadata__":
            s, e = h["data_offsets"]
            out[key] = Entry(path, h["dtype"], h["shape"], base + s, base + e)
    return out


def spill(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Entry]:
    """Write tensors to a safetensors file (small: one group's) and say where each one lies."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return entries_of(path)


class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint directory, by name, read lazily."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                self.index = json.loads(index.read_text(encoding="utf-8"))
                files = sorted(set(self.index["weight_map"].values()))
            except (ValueError, KeyError):
                raise BakeError(f"--model: {index} is not a safetensors index (no weight_map)") from None
        elif (self.folder / SINGLE).is_file():
            self.index, files = None, [SINGLE]
        else:
            raise BakeError(f"--model: {str(folder)!r} holds no {SINGLE} or {INDEX}")
        self.files = files
        self.entries: dict[str, Entry] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise BakeError(f"--model: shard {name} named by {INDEX} is missing")
            self.entries.update(entries_of(path))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (its stored dtype)."""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        if out.numel():
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(e.file, "rb") as f:  # straight into the tensor's memory: no intermediate copy
                f.seek(e.start)
                if f.readinto(view) != e.end - e.start:
                    raise BakeError(f"--model: {e.file.name} ends before tensor {name}")
        return out

    def rows(self, name: str, idx: list[int]) -> torch.Tensor:
        """Some rows (indices along the first axis) of one tensor, read without reading the rest."""
        e = self.entries[name]
        if len(e.shape) < 1:
            return self.tensor(name)
        row = torch.empty(e.shape[1:], dtype=DTYPES[e.dtype])
        size = row.numel() * row.element_size()
        out = torch.empty((len(idx), *e.shape[1:]), dtype=row.dtype)
        with open(e.file, "rb") as f:
            for k, i in enumerate(idx):
                f.seek(e.start + i * size)
                view = memoryview(out[k].reshape(-1).view(torch.uint8).numpy())
                if size and f.readinto(view) != size:
                    raise BakeError(f"--model: {e.file.name} ends before tensor {name}")
        return out

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name].dtype]

    def names_in(self, file: str) -> list[str]:
        path = self.folder / file
        return [k for k, e in sorted(self.entries.items(), key=lambda kv: kv[1].start) if e.file == path]


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def write_shard(path: Path, names: list[str], sources: dict) -> int:
    """Write one safetensors file holding `names` in order, each from `sources[name]`: a tensor, or an
    Entry whose bytes are copied from its file as they are. Returns the bytes of tensor data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        src = sources[name]
        if isinstance(src, torch.Tensor):
            dtype, shape, size = NAMES[src.dtype], list(src.shape), src.numel() * src.element_size()
        else:
            dtype, shape, size = src.dtype, src.shape, src.end - src.start
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            src = sources[name]
            if isinstance(src, torch.Tensor):
                f.write(_bytes(src))
                continue
            f.flush()
            _copy_range(src.file, src.start, src.end - src.start, f, name)
    return offset


def _copy_range(path: Path, start: int, count: int, f, name: str, at: int | None = None) -> None:
    """Copy bytes [start, start + count) of `path` into the open file `f` at offset `at` (default: its
    end): in the kernel (copy_file_range) where the platform has it, else through a buffer."""
    pos = f.seek(0, os.SEEK_END) if at is None else at
    with open(path, "rb") as g:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < count:
                    n = os.copy_file_range(g.fileno(), f.fileno(), min(count - done, 1 << 30), start + done,
                                           pos + done)
                    if n == 0:
                        raise BakeError(f"--model: {path.name} ends before tensor {name}")
                    done += n
            except OSError:  # another filesystem or an old kernel: the rest through a buffer
                pass
        g.seek(start + done)
        f.seek(pos + done)
        while done < count:
            chunk = g.read(min(CHUNK, count - done))
            if not chunk:
                raise BakeError(f"--model: {path.name} ends before tensor {name}")
            f.write(chunk)
            done += len(chunk)
        f.seek(0, os.SEEK_END)  # keep the Python file object's position in step with the fd


def patch(path: Path, offset: int, src: Entry, name: str) -> None:
    """Overwrite bytes [offset, offset + size) of the file at `path` with a tensor's bytes of the same
    size from `src` (a copied shard whose changed tensors are patched in place: same dtype and shape,
    so the header and every other byte stay)."""
    with open(path, "r+b") as f:
        _copy_range(src.file, src.start, src.end - src.start, f, name, at=offset)


def place(src: Path, dst: Path, link: bool) -> str:
    """Put an untouched shard at dst: a hard link where asked and possible, else a copy."""
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


class CheckpointStore(TensorStore):
    """The tensors of a checkpoint on disk for the passes (`bake.store`): read on demand, as stored, or
    from what `prefetch` read ahead on a reader thread (one group ahead); writes are held until `flush`,
    which rounds them to the stored dtype (a new bias: its weight's), refuses NaN / Inf, drops those equal
    to the stored bytes, and spills the others to a small file under `spill_dir`. Peak memory: about
    two groups' touched modules."""

    def __init__(self, ckpt: Checkpoint, spill_dir: Path, reader):
        self.ckpt, self.spill_dir, self.reader = ckpt, spill_dir, reader
        self.pending: dict[str, torch.Tensor] = {}
        self.spilled: dict[str, Entry] = {}
        self.ahead: list = []  # futures of prefetched groups, current first
        self.flushes = 0

    def has(self, name: str) -> bool:
        return name in self.pending or name in self.spilled or name in self.ckpt.entries

    def get(self, name: str) -> torch.Tensor:
        if name in self.pending:
            return self.pending[name]
        if name in self.spilled:
            return _read_entry(self.spilled[name])
        if self.ahead:
            cached = self.ahead[0].result()
            if name in cached:
                return cached[name]
        if name not in self.ckpt.entries:
            raise BakeError(f"--model: tensor {name} is missing from the checkpoint")
        return self.ckpt.tensor(name)

    def rows(self, name: str, idx: list[int]) -> torch.Tensor:
        return self.ckpt.rows(name, idx)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.pending[name] = value

    def out_dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def stored_dtype(self, name: str) -> torch.dtype:
        if name in self.ckpt.entries:
            return self.ckpt.dtype(name)
        return self.ckpt.dtype(name.rsplit(".", 1)[0] + ".weight")

    def prefetch(self, names: list[str]) -> None:
        self.ahead.append(self.reader.submit(_read_all, self, names))

    def flush(self) -> None:
        cached = self.ahead.pop(0).result() if self.ahead else {}
        changed = {}
        for name, t in self.pending.items():
            t = t.detach().to(self.stored_dtype(name)).contiguous()
            check_finite([(name, t)], "the folded weights", "the stored dtype")
            if name in self.ckpt.entries:
                orig = cached[name] if name in cached else self.ckpt.tensor(name)
                if torch.equal(t, orig):
                    continue  # the fold left it as stored
            changed[name] = t
        self.pending = {}
        if changed:
            self.spilled.update(spill(changed, self.spill_dir / f"{self.flushes:05d}.safetensors"))
            self.flushes += 1

    def new_names(self) -> list[str]:
        return sorted(n for n in self.spilled if n not in self.ckpt.entries)


def _read_all(store: CheckpointStore, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        if name not in store.ckpt.entries:
            raise BakeError(f"--model: tensor {name} is missing from the checkpoint")
        out[name] = store.ckpt.tensor(name)
    return out


def _read_entry(e: Entry) -> torch.Tensor:
    out = torch.empty(e.shape, dtype=DTYPES[e.dtype])
    if out.numel():
        with open(e.file, "rb") as f:
            f.seek(e.start)
            f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
    return out


EXTRA = "model-bake-extra.safetensors"
WEIGHT_FILES = (INDEX, SINGLE, "config.json", "README.md", "bake_report.json")


def start_copies(ckpt: Checkpoint, tmp: Path, copier, link: bool) -> dict:
    """Without --link every shard of a sharded checkpoint is copied whole, starting now, on the copier
    thread (a shard that changes is patched in place afterwards); with --link, or for one file, the
    shards are placed once the writes are known (`write_checkpoint`)."""
    if ckpt.index is None or link:
        return {}
    return {f: copier.submit(place, ckpt.folder / f, tmp / f, False) for f in ckpt.files}


def write_checkpoint(store: CheckpointStore, tmp: Path, placed: dict, link: bool) -> str:
    """The output's weight files from the store's spilled writes: a changed shard is patched in place (a
    single file, or a shard whose tensors changed shape, rewritten; new tensors join a single file), an unchanged one copied or hard-linked, new tensors of
    a sharded checkpoint go to one extra shard, and the index is rewritten. Returns what was done."""
    ckpt, single = store.ckpt, store.ckpt.index is None
    new_names, spilled = store.new_names(), store.spilled
    weight_map, total, how = {}, 0, {"rewritten": 0, "copied": 0, "linked": 0}
    done = {f: fut.result() for f, fut in placed.items()}
    for file in tqdm(ckpt.files, desc="write shards", unit="shard", leave=False):
        names = ckpt.names_in(file) + (new_names if single else [])
        changed = [n for n in names if n in spilled]
        resized = any(spilled[n].shape != ckpt.entries[n].shape for n in changed if n in ckpt.entries)
        if (single or resized) and changed:  # a grown MLP's tensors change shape: the shard is rewritten
            total += write_shard(tmp / file, names, {n: spilled.get(n) or ckpt.entries[n] for n in names})
        elif changed:
            if file not in done:
                place(ckpt.folder / file, tmp / file, False)
            for n in changed:
                patch(tmp / file, ckpt.entries[n].start, spilled[n], n)
            total += sum(ckpt.entries[n].end - ckpt.entries[n].start for n in names)
        else:
            if file not in done:
                done[file] = place(ckpt.folder / file, tmp / file, link)
            how[done[file]] += 1
            total += sum(ckpt.entries[n].end - ckpt.entries[n].start for n in names)
        how["rewritten"] += bool(changed)
        weight_map.update({n: file for n in names})
    if new_names and not single:
        total += write_shard(tmp / EXTRA, new_names, spilled)
        weight_map.update({n: EXTRA for n in new_names})
    if not single:
        meta = dict((ckpt.index or {}).get("metadata", {}))
        meta["total_size"] = total
        (tmp / INDEX).write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n", encoding="utf-8")
    return (f"{how['rewritten']} rewritten, {how['copied']} copied, {how['linked']} hard-linked; "
            f"{len(new_names)} new tensor(s) in {EXTRA if new_names else '-'}")


CODE_SUFFIXES = (".py", ".pyc", ".so", ".dll", ".dylib")


def copy_side_files(source: Path, tmp: Path, ckpt: Checkpoint) -> None:
    """Tokenizer, generation config, …: as they are; never the source's code (its `.py` modules: the
    in-memory bake writes none either; the `auto_map` naming them is dropped by `make_portable`)."""
    for f in source.iterdir():
        if (f.is_file() and f.name not in WEIGHT_FILES and f.name not in ckpt.files and not (tmp / f.name).exists()
                and not f.name.endswith(CODE_SUFFIXES)):
            shutil.copyfile(f, tmp / f.name)
