"""The one I/O layer for Hugging Face checkpoints, shared by merging and AIM.

* `resolve_model_dir` turns a local folder or a hub id into a local folder (downloads weights,
  config and tokenizer files through huggingface_hub; one-line error when that fails).
* `CheckpointReader` reads tensor names, shapes and dtypes from headers only and loads one
  tensor at a time: sharded or single safetensors through `safe_open`, legacy
  `pytorch_model*.bin` through `torch.load(mmap=True, weights_only=True)`.
* `ShardedWriter` plans shards from known sizes, writes each shard's header first and every
  tensor at its planned offset the moment it arrives (nothing is held in memory), then the index.
Output folders (checks, staging, crash leftovers) are in `checkpoints.output`.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints.errors import UserError, first_line, writing

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Files copied from a source model folder to a merged output (besides the weights).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MODEL_SIDE_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")  # output heads (tied to the embedding or not)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """'bf16'/'bfloat16'/'fp16'/'float16'/'fp32'/'float32' -> torch dtype (UserError otherwise)."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32"}
    key = aliases.get(name.lower(), name.lower())
    if key not in DTYPE_NAMES:
        raise UserError(f"{flag}: unknown dtype {name!r}; use bfloat16, float16 or float32")
    return DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------
# Locating checkpoints


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not os.path.isabs(name))


def resolve_model_dir(name_or_path: str, flag: str) -> Path:
    """A local model folder for `name_or_path`: a folder, or a hub id (`org/name`, or
    `org/name@revision` for a branch, tag or commit, as mergekit writes it) that is downloaded."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag}: {name_or_path} is a file; pass the model's folder")
        return path
    repo_id, _, revision = name_or_path.partition("@")
    if revision and Path(repo_id).expanduser().exists():
        raise UserError(f"{flag}: {name_or_path}: {repo_id} is a local folder, which has no "
                        f"revisions; drop @{revision} or give a hub id")
    if not _looks_like_hub_id(repo_id) or (revision and "@" in revision):
        raise UserError(f"{flag}: {name_or_path} does not exist; pass a model folder or a hub id "
                        "like org/name or org/name@revision")
    return _download_from_hub(repo_id, flag, revision or None)


def _download_from_hub(repo_id: str, flag: str, revision: str | None = None) -> Path:
    """Download weights (safetensors preferred, else .bin), config and tokenizer files of
    `revision` (None: the default branch); with the Hub unreachable, the copy in the local
    Hugging Face cache, else a one-line error at once."""
    from huggingface_hub import HfApi, snapshot_download

    from checkpoints.hub import hub_unreachable

    name = repo_id if revision is None else f"{repo_id}@{revision}"
    down = hub_unreachable()
    if down:
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the one line below
            raise UserError(f"{flag}: {name!r} is no local folder, not in the Hugging Face cache, "
                            f"and the Hub is unreachable ({down}); pass a local folder") from None
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        weights = ["*.safetensors", "*.safetensors.index.json"]
        if not any(f.endswith(".safetensors") for f in files):
            weights = ["*.bin", "*.bin.index.json"]
        folder = snapshot_download(repo_id, revision=revision,
                                   allow_patterns=[*weights, *MODEL_SIDE_FILES])
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line for the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag}: could not fetch {name!r} from the Hugging Face Hub "
                        f"({reason}); download it elsewhere and pass the local folder instead")
    return Path(folder)


# ----------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader:
    """Lazy, tensor-at-a-time access to the weights of one model folder.

    Headers are read once at construction (names, shapes, dtypes, no tensor data); each
    shard is opened on first use and its handle kept.
    """

    def __init__(self, folder: Path, label: str):
        self.folder = Path(folder)
        self.label = label
        self._file_of: dict[str, str] = {}
        self.info: dict[str, TensorInfo] = {}
        self._handles: dict[str, object] = {}
        for fname in self._weight_files():
            self._read_header(fname)
        if not self.info:
            raise UserError(f"{label}: no tensors found in {self.folder}")
        self.config = self._read_json("config.json")

    # -- discovery ------------------------------------------------------------------------
    def _weight_files(self) -> list[str]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.folder / index_name
            if index_path.exists():
                weight_map = self._read_json(index_name).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise UserError(f"{self.label}: {index_path} has no weight_map; re-download "
                                    "the checkpoint")
                files = list(dict.fromkeys(weight_map.values()))
                missing = [f for f in files if not (self.folder / f).exists()]
                if missing:
                    raise UserError(f"{self.label}: shard {missing[0]} listed in {index_name} is "
                                    f"missing from {self.folder}; re-download the checkpoint")
                return files
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (self.folder / single).exists():
                return [single]
        others = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if others:
            return others
        raise UserError(f"{self.label}: no model weights (*.safetensors or pytorch_model*.bin) "
                        f"in {self.folder}")

    def _read_json(self, name: str) -> dict:
        path = self.folder / name
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{self.label}: cannot read {path} ({err}); fix or re-download it")

    def _open(self, fname: str):
        if fname not in self._handles:
            path = self.folder / fname
            try:
                if fname.endswith(".safetensors"):
                    self._handles[fname] = SafetensorsFile(path)
                else:
                    self._handles[fname] = _load_bin_lazily(path)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - corrupt/unreadable file -> one line
                raise UserError(f"{self.label}: cannot read {path} ({first_line(err)}); "
                                "re-download the file")
        return self._handles[fname]

    def _read_header(self, fname: str) -> None:
        handle = self._open(fname)
        if isinstance(handle, SafetensorsFile):
            for name, (info, _, _) in handle.entries.items():
                self.info[name] = info
                self._file_of[name] = fname
        else:
            for name, tensor in handle.items():
                self.info[name] = TensorInfo(tuple(tensor.shape), tensor.dtype)
                self._file_of[name] = fname

    # -- access ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard)."""
        return list(self.info)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name` (or its rows start:stop) in its stored dtype, on CPU."""
        handle = self._open(self._file_of[name])
        try:
            if isinstance(handle, dict):
                return handle[name] if rows is None else handle[name][rows[0]:rows[1]]
            return handle.read(name, rows)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{self.label}: cannot read tensor {name} from "
                            f"{self.folder / self._file_of[name]} ({first_line(err)}); "
                            "re-download the file")

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size") or self.config.get("text_config", {}).get("vocab_size")

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's declared dtype (config), else the dtype of its first float tensor."""
        declared = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(declared, str) and declared in DTYPE_NAMES:
            return DTYPE_NAMES[declared]
        for info in self.info.values():
            if info.dtype.is_floating_point:
                return info.dtype
        return torch.bfloat16


class SafetensorsFile:
    """A safetensors file read with one positioned read per tensor into a fresh buffer.

    Unlike a memory map, nothing stays resident after a tensor is freed, so peak RSS is the
    live tensors only; unlike safetensors' own `pread` backend, a tensor is a single read.
    Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}}, then the data.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file is shorter than a safetensors header")
            length = int.from_bytes(head, "little")
            if length > 100 * 2**20:
                raise ValueError("header length is implausible; not a safetensors file")
            header = json.loads(f.read(length))
        self.data_start = 8 + length
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            self.entries[name] = (TensorInfo(tuple(meta["shape"]), dtype), begin, end)
        expected = self.data_start + max((end for _, _, end in self.entries.values()), default=0)
        size = self.path.stat().st_size
        if size < expected:
            raise ValueError(f"file is truncated: {size} bytes, its header needs {expected}")
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows start:stop (one contiguous byte range), in a fresh buffer."""
        info, begin, end = self.entries[name]
        shape = info.shape
        if rows is not None and shape:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        raw = torch.empty(end - begin, dtype=torch.uint8)
        read_exact(self._fd, memoryview(raw.numpy()), self.data_start + begin,
                   f"tensor {name}")
        return raw.view(info.dtype).reshape(shape)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def finite(tensor: torch.Tensor, label: str, name: str) -> torch.Tensor:
    """`tensor` itself; NaN or inf in it is a UserError naming the checkpoint and tensor."""
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise UserError(f"{label}: tensor {name} contains NaN or inf; the checkpoint is "
                        "corrupt or was saved in too narrow a dtype")
    return tensor


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters of a loaded model that hold NaN or inf."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def _load_bin_lazily(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict memory-mapped when the file is in the zip format (transformers >= 4.x)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        log.warning("%s is in the legacy pickle format and cannot be memory-mapped; "
                    "loading it whole", path.name)
        return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------
# Writing


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"{flag}: cannot parse {text!r}; use e.g. 5GB or 500MB")
    if value <= 0:
        raise UserError(f"{flag}: must be positive, got {text!r}")
    return int(value)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most max_shard_bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes.items():
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class _ShardFile:
    """One output safetensors file whose layout is fixed up front: the header is written
    first and each tensor's bytes are written at their offset when the tensor arrives."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], bounce: memoryview | None = None):
        order = sorted(infos, key=lambda n: -infos[n].dtype.itemsize)   # keeps data aligned
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in order:
            info = infos[name]
            header[name] = {"dtype": _DTYPE_CODES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            self.offsets[name] = offset
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.data_start = 8 + len(blob)
        self.waiting = {name: infos[name].nbytes for name in infos}   # bytes still to arrive
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(self.fd, memoryview(len(blob).to_bytes(8, "little") + blob), 0)
        self.bounce = bounce
        self.direct = _open_direct(path) if bounce is not None else None

    def write(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Write `tensor`'s bytes at `byte_offset` inside the tensor `name`."""
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        view, offset = memoryview(data.numpy()), self.data_start + self.offsets[name] + byte_offset
        if self.direct is None:
            write_all(self.fd, view, offset)
        elif not write_direct(self.fd, self.direct, view, offset, self.bounce):
            os.close(self.direct)   # the file system refused a direct write: page cache only
            self.direct = None
        self.waiting[name] -= data.numel()
        if not self.waiting[name]:
            del self.waiting[name]
        if not self.waiting:
            os.close(self.fd)
            if self.direct is not None:
                os.close(self.direct)


# A writer on a thread of its own writes past the page cache (O_DIRECT) where the file system
# allows it: writing 1 GiB through the page cache took 0.2-1.0 s of kernel CPU here (0.2-2.5 s
# wall), direct 0.06 s (0.4-0.5 s wall, waiting for the disk), and on two cores that CPU is
# taken from the merge; a writer in the loop itself keeps the page cache's quick return (a
# passthrough merge took 3.4 s with direct writes, 1.9 s without). Direct writes need
# page-aligned offsets, lengths and memory: the whole pages of a write go through a page-aligned
# bounce buffer of DIRECT_PIECE bytes, the partial pages at its ends through the page cache.
DIRECT_WRITES = hasattr(os, "O_DIRECT")
PAGE, DIRECT_PIECE = 4096, 1 << 21


def _open_direct(path: Path) -> int | None:
    """A second descriptor of `path` for direct writes, or None where the file system has none."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def bounce_buffer() -> memoryview | None:
    """A page-aligned buffer for direct writes (anonymous memory is), or None without them."""
    return memoryview(mmap.mmap(-1, DIRECT_PIECE)) if DIRECT_WRITES else None


def write_direct(fd: int, direct: int, data: memoryview, offset: int, bounce: memoryview) -> bool:
    """Write `data` at `offset`: its whole pages through `direct` (copied into `bounce`), the
    rest through `fd`. False when the file system refused a direct write (that part and the
    rest then went through `fd`)."""
    end = offset + len(data)
    first, last = -(-offset // PAGE) * PAGE, end // PAGE * PAGE   # the whole pages: first..last
    if last <= first:
        write_all(fd, data, offset)
        return True
    write_all(fd, data[: first - offset], offset)
    write_all(fd, data[last - offset:], last)
    for start in range(first, last, len(bounce)):
        size = min(len(bounce), last - start)
        bounce[:size] = data[start - offset: start - offset + size]
        try:
            written = os.pwrite(direct, bounce[:size], start)
        except OSError:
            written = 0
        if written != size:   # refused, or a short write: the rest through the page cache
            write_all(fd, data[start - offset + written: last - offset], start + written)
            return False
    return True


def read_exact(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill `view` from file offset `offset` with positioned reads (no shared file position,
    so threads may read one file at once); an OSError naming `what` if the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"unexpected end of file at {what}")
        done += got


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at file offset `offset` with positioned writes."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class ShardedWriter:
    """Writes a planned set of tensors as `model-0000k-of-0000N.safetensors` + index.

    Shard layouts are planned from the known shapes, so each tensor is written to disk the
    moment it arrives, in any order, and nothing is held in memory. `close()` checks that
    everything arrived and writes the index.
    """

    def __init__(self, folder: Path, infos: dict[str, TensorInfo], max_shard_bytes: int,
                 direct: bool = False):
        self.folder = Path(folder)
        self.infos = infos
        shards = plan_shards({n: i.nbytes for n, i in infos.items()}, max_shard_bytes)
        if len(shards) == 1:
            self.file_names = [SAFETENSORS_SINGLE]
        else:
            self.file_names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                               for k in range(len(shards))]
        self._shard_names = shards
        self._shard_of = {n: k for k, names in enumerate(shards) for n in names}
        self._files: dict[int, _ShardFile] = {}
        # direct writes (`direct`, for a writer on a thread of its own, which may wait for the
        # disk): one bounce buffer shared by the shard files, one is written at a time
        self._bounce = bounce_buffer() if direct else None

    def add(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write the tensor `name`, or rows of it starting at `row_start` (each row once)."""
        info = self.infos[name]
        fits = (tuple(tensor.shape) == info.shape if row_start == 0 and tensor.ndim == 0 else
                tensor.ndim == len(info.shape) and tuple(tensor.shape[1:]) == info.shape[1:]
                and row_start + tensor.shape[0] <= info.shape[0])
        if not fits or tensor.dtype != info.dtype:
            raise ValueError(f"{name}: planned {info.shape} {info.dtype}, got rows from "
                             f"{row_start} of {tuple(tensor.shape)} {tensor.dtype}")
        k = self._shard_of[name]
        path = self.folder / self.file_names[k]
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        with writing(path):
            if k not in self._files:
                self._files[k] = _ShardFile(path, {n: self.infos[n] for n in self._shard_names[k]},
                                            self._bounce)
            self._files[k].write(name, tensor, row_start * row_bytes)

    def close(self) -> None:
        missing = sorted(set(self.infos) - {n for f in self._files.values()
                                            for n in f.offsets if n not in f.waiting})
        if missing:
            raise RuntimeError(f"writer closed with {len(missing)} tensors missing, e.g. {missing[0]}")
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in self.infos.values()),
                             "total_parameters": sum(i.numel for i in self.infos.values())},
                "weight_map": {n: self.file_names[k] for n, k in self._shard_of.items()},
            }
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def load_tokenizer(folder: Path, label: str, flag: str, hint: str = ""):
    """The tokenizer of a model folder; any failure is one UserError line (`hint` appended)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a broken tokenizer is one line for the user
        raise UserError(f"{flag}: cannot load the tokenizer of {label} "
                        f"({first_line(err)[:160]}){hint}") from None


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def dtype_config_update(config: dict, dtype: torch.dtype) -> dict:
    """config.json keys to set so the config declares `dtype` (v5 'dtype' / v4 'torch_dtype')."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    return {k: dtype_name(dtype) for k in keys}


def copy_model_files(src: Path, dst: Path, *, names: tuple[str, ...] = MODEL_SIDE_FILES,
                     config_updates: dict | None = None) -> list[str]:
    """Copy config, generation config, tokenizer files and chat template from src to dst.

    config.json is copied verbatim (transformers 5 would rewrite rope settings if re-saved)
    except for the keys in `config_updates` (e.g. the output dtype). Returns the names copied.
    """
    copied = []
    for name in names:
        source = Path(src) / name
        if not source.exists():
            continue
        with writing(Path(dst) / name):
            if name == "config.json" and config_updates:
                config = json.loads(source.read_text())
                config.update(config_updates)
                (Path(dst) / name).write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copyfile(source, Path(dst) / name)
        copied.append(name)
    return copied
