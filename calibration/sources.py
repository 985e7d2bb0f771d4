"""Calibration texts for AIM: a Hugging Face dataset, local files, or a built-in offline corpus.

`load_texts(source)` returns the documents of a source as a `Sequence[str]` in the source's own
order; `calibration.blocks.build_blocks` shuffles and selects from it (ALGORITHMS.md §12.4).

Sources (`--calib_data`):
* an HF dataset id (default `mit-han-lab/pile-val-backup`, split `validation`, column `text`),
  loaded with `datasets.load_dataset`; rows are read lazily, so the 471 MB Pile validation set is
  never copied into Python strings. Needs network (or the datasets cache) and, for the Pile
  backup, the `zstandard` package.
* a local file: `.txt` (one document per paragraph: paragraphs are separated by one or more blank
  lines, line breaks inside a paragraph are kept), `.jsonl` (one JSON object per line, field
  `text`), `.json` (a list of objects with field `text`, a list of strings, or an object whose
  `text` entry is a list of strings), `.parquet` (column `text`);
* a folder: every file with one of those suffixes below it (recursively, hidden files skipped),
  in sorted path order, documents concatenated;
* `builtin`: English technical prose shipped with CPython itself (`pydoc_data.topics`, the
  text of `help()` topics: 79 entries, about 465,000 characters), cut into documents of whole
  paragraphs of at most about 1,000 characters (~250 Llama tokens), so that no network and no
  extra package is needed. About 550 documents.
"""
from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

from checkpoints.errors import UserError

DEFAULT_CALIB_DATA = "mit-han-lab/pile-val-backup"
BUILTIN = "builtin"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
BUILTIN_DOC_CHARS = 1000
_OFFLINE_HINT = "use --calib_data builtin or a local .txt/.jsonl/.json/.parquet file or folder"
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def load_texts(source: str, *, split: str = "validation", text_field: str = "text") -> Sequence[str]:
    """The documents of `source` (HF dataset id, local file/folder, or `builtin`), in source order."""
    if source == BUILTIN:
        return builtin_texts()
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_texts(path, text_field)
    if path.is_file():
        return _file_texts(path, text_field)
    if path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"--calib_data {source}: no such file or folder")
    return _hub_texts(source, split, text_field)


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of `text` (separated by blank lines), without whitespace-only ones."""
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def builtin_texts(max_chars: int = BUILTIN_DOC_CHARS) -> list[str]:
    """The offline corpus: pydoc topics (sorted by name), whole paragraphs packed into documents.

    Paragraphs of one topic are joined greedily while the document stays within `max_chars`; a
    longer paragraph becomes a document of its own (build_blocks may later skip it as too long).
    """
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        current: list[str] = []
        for para in split_paragraphs(topics[name]):
            if current and len("\n\n".join([*current, para])) > max_chars:
                docs.append("\n\n".join(current))
                current = []
            current.append(para)
        if current:
            docs.append("\n\n".join(current))
    return docs


class _HubTexts(Sequence[str]):
    """Lazy view of one text column of a `datasets.Dataset` (row access reads one row)."""

    def __init__(self, dataset: Any, field: str):
        self._dataset, self._field = dataset, field

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._dataset[int(index)][self._field]


def _hub_texts(source: str, split: str, text_field: str) -> Sequence[str]:
    if source == DEFAULT_CALIB_DATA and find_spec("zstandard") is None:
        raise UserError(f"--calib_data {source} needs the zstandard package (pip install zstandard); "
                        f"or {_OFFLINE_HINT}")
    import datasets

    from checkpoints.hub import hub_unreachable

    down = hub_unreachable()
    if down and not datasets.config.HF_HUB_OFFLINE:  # offline mode reads the cache at once
        raise UserError(f"--calib_data {source}: the Hugging Face Hub is unreachable ({down}); "
                        f"{_OFFLINE_HINT} (or HF_DATASETS_OFFLINE=1 to use a cached copy)")
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # hub unreachable, unknown id, bad split, missing extra: all user-fixable
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--calib_data {source}: could not load the Hugging Face dataset "
                        f"(split {split!r}): {reason[:200]}; {_OFFLINE_HINT}") from err
    if text_field not in dataset.column_names:
        raise UserError(f"--calib_data {source}: split {split!r} has no column {text_field!r} "
                        f"(columns: {', '.join(dataset.column_names)})")
    return _HubTexts(dataset, text_field)


def _folder_texts(folder: Path, text_field: str) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise UserError(f"--calib_data {folder}: the folder has no {'/'.join(LOCAL_SUFFIXES)} files")
    return [text for path in files for text in _file_texts(path, text_field)]


def _file_texts(path: Path, text_field: str) -> list[str]:
    """The documents of one local file; unreadable or empty files are UserErrors."""
    try:
        texts = _read_file_texts(path, text_field)
    except UnicodeDecodeError as err:
        raise UserError(f"--calib_data {path}: not UTF-8 text (byte {err.start} cannot be decoded); "
                        "pass a text file or convert it to UTF-8") from None
    if not texts:
        what = "the file is empty" if path.stat().st_size == 0 else "it holds no documents"
        raise UserError(f"--calib_data {path}: {what}; pass a file with calibration text")
    return texts


def _read_file_texts(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return split_paragraphs(path.read_text(encoding="utf-8"))
    if suffix == ".jsonl":
        return _jsonl_texts(path, text_field)
    if suffix == ".json":
        return _json_texts(path, text_field)
    if suffix == ".parquet":
        return _parquet_texts(path, text_field)
    raise UserError(f"--calib_data {path}: unsupported file type {suffix or '(none)'}; "
                    f"use one of {', '.join(LOCAL_SUFFIXES)}")


def _field(row: Any, text_field: str, where: str) -> str:
    value = row.get(text_field) if isinstance(row, dict) else row
    if not isinstance(value, str):
        raise UserError(f"--calib_data {where}: expected a string field {text_field!r}")
    return value


def _jsonl_texts(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"--calib_data {path}: line {number} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise UserError(f"--calib_data {path}: line {number} is not a JSON object")
            texts.append(_field(row, text_field, f"{path} line {number}"))
    return texts


def _json_texts(path: Path, text_field: str) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"--calib_data {path}: not valid JSON ({err.msg}); "
                        "use .jsonl for one object per line") from err
    if isinstance(data, dict) and isinstance(data.get(text_field), list):
        data = data[text_field]
    if not isinstance(data, list):
        raise UserError(f"--calib_data {path}: expected a JSON list of objects with {text_field!r}")
    return [_field(row, text_field, f"{path} item {i}") for i, row in enumerate(data)]


def _parquet_texts(path: Path, text_field: str) -> list[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise UserError(f"--calib_data {path}: no column {text_field!r} (columns: "
                            f"{', '.join(schema.names)})")
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except pyarrow.ArrowException as err:
        raise UserError(f"--calib_data {path}: not a readable parquet file "
                        f"({str(err).strip()[:160]}); re-create it or use .jsonl") from None
    return [_field(value, text_field, f"{path} row {i}") for i, value in enumerate(column)]
