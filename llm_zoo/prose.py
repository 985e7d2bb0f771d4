"""General English prose that ships with Python, split three ways so no text serves twice.

- calibration and held-out perplexity: the pydoc topics (`calibration.sources.builtin_texts`,
  the same documents as `--calib_data builtin`); every 4th document (from the 4th) is held out
  for the perplexity benchmark, the other three quarters are the study's AIM calibration set
- replay during fine-tuning: docstrings of standard-library modules and their public members,
  a different text (the experts keep general language without training on either set)

Both depend on the Python version's documentation, so they are written into the zoo's data
folder at build time and read from there afterwards.
"""
from __future__ import annotations

import importlib
import inspect
import warnings

from calibration.sources import builtin_texts

HELD_OUT_EVERY = 4
REPLAY_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
                  "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
                  "io", "itertools", "json", "logging", "math", "multiprocessing", "os", "pathlib",
                  "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
                  "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing",
                  "unittest", "urllib.parse", "uuid", "zipfile")
MIN_DOC_CHARS = 300


def pydoc_split() -> tuple[list[str], list[str]]:
    """(calibration documents, held-out perplexity documents) of the pydoc topics."""
    docs = builtin_texts()
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    calib = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return calib, held


def replay_texts() -> list[str]:
    """Docstrings (>= MIN_DOC_CHARS) of REPLAY_MODULES and their public members, deduplicated."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in REPLAY_MODULES:
            module = importlib.import_module(name)
            objects = [module] + [getattr(module, attr) for attr in sorted(dir(module))
                                  if not attr.startswith("_")]
            for obj in objects:
                doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                               or inspect.isroutine(obj)) else None
                if doc and len(doc) >= MIN_DOC_CHARS:
                    seen.setdefault(doc.strip())
    return list(seen)
