"""Save and reuse the base model's AIM activation statistics (`--stats PATH`).

File format: one safetensors file. Each tensor is a float32 vector `S` (one value per input channel)
named after the checkpoint tensor it relaxes (e.g. `model.layers.0.self_attn.q_proj.weight`).
String metadata:

| key | meaning |
|---|---|
| `format` | `pt` (safetensors convention) |
| `aim_stats` | schema version of this file (`1`) |
| `toolkit_version` | version of this toolkit that wrote it |
| `base_model` | base model path or hub id, as given |
| `base_fingerprint` | `base_fingerprint()` of the base folder (config + weight files) |
| `calib_data`, `calib_split`, `calib_text_field` | calibration source (§12.4) |
| `calib_samples`, `block_size`, `calib_seed` | calibration settings |
| `dtype` | dtype of the calibration forward pass |
| `n_blocks`, `blocks_sha256` | number of calibration blocks and SHA-256 of their token ids |
| `axes` | JSON {tensor name: input-feature axis of that weight} |
| `tied` | JSON {tensor name: checkpoint tensor sharing its storage}, e.g. a tied lm_head |
| `unrelaxed` | JSON {parameter name: why AIM cannot relax it} |

A file is reused only when `aim_stats` and every `StatsKey` field match the request; otherwise
`load_stats` raises a UserError that names `--stats` and lists what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from checkpoints.errors import UserError

SCHEMA_VERSION = "1"
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
_SAMPLE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ActivationStats:
    """Per-input-channel statistics of the base model, keyed by checkpoint tensor name."""

    stats: dict[str, torch.Tensor]   # name -> float32 [C], C = weight.shape[axes[name]]
    axes: dict[str, int]              # name -> input-feature axis of that weight
    tied: dict[str, str] = field(default_factory=dict)       # name -> tensor it shares storage with
    unrelaxed: dict[str, str] = field(default_factory=dict)  # parameter -> why it is not relaxed

    def for_relaxation(self, relax_tied_lm_head: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(stats, axes) keyed by the checkpoint tensor to relax; a tied weight (the lm_head that
        shares `model.embed_tokens.weight`) is left out, or relaxed under the shared name if asked."""
        stats, axes = {}, {}
        for name, stat in self.stats.items():
            if name in self.tied and not relax_tied_lm_head:
                continue
            target = self.tied.get(name, name)
            stats[target], axes[target] = stat, self.axes[name]
        return stats, axes

    def relaxation_summary(self, relax_tied_lm_head: bool) -> str:
        """One line on the hooked modules that were not relaxed (or that every one was)."""
        parts = [self.unrelaxed_summary()] if self.unrelaxed else []
        if self.tied and not relax_tied_lm_head:
            parts.append(f"{', '.join(sorted(self.tied))} not relaxed: tied to "
                         f"{', '.join(sorted(set(self.tied.values())))} (--aim_relax_tied_lm_head "
                         "relaxes both)")
        return "; ".join(parts) or "every hooked module relaxed"

    def unrelaxed_summary(self, examples: int = 2) -> str:
        """One line: how many parameters stay as merged, grouped by reason, with example names."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in sorted(self.unrelaxed.items()):
            by_reason.setdefault(reason, []).append(name)
        parts = [f"{len(names)} {reason} (e.g. {', '.join(names[:examples])})" for reason, names in by_reason.items()]
        return f"{len(self.unrelaxed)} parameters are not relaxed and stay as merged: " + "; ".join(parts)


@dataclass(frozen=True)
class StatsKey:
    """Everything the statistics depend on; a stats file is reused only if all of it matches."""

    base_fingerprint: str
    calib_data: str
    calib_samples: int
    block_size: int
    calib_seed: int
    dtype: str
    calib_split: str = "validation"
    calib_text_field: str = "text"

    def as_metadata(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


def base_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 identifying a local base checkpoint folder.

    Covers config.json (parsed, keys sorted, without transformers_version/_name_or_path) and, per
    weight file in sorted order: its name, size, first and last MiB. The first MiB of a
    safetensors file is its header (every tensor's name, dtype and shape); the samples of weight
    bytes tell apart two fine-tunes of one architecture.
    """
    folder = Path(model_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"--pretrained_model_name {model_dir}: no config.json in that folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    for path in weights:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(0, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def blocks_sha256(blocks: torch.Tensor) -> str:
    """SHA-256 of calibration token blocks (shape and int64 values)."""
    data = blocks.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(data.shape)}".encode() + data.numpy().tobytes()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the recipe records it for the stats file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_stats(path: str | Path, stats: ActivationStats, key: StatsKey, *, base_model: str,
               blocks: torch.Tensor, toolkit_version: str) -> None:
    """Write `stats` and its metadata to `path` (atomically: temp file + rename)."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt", "aim_stats": SCHEMA_VERSION, "toolkit_version": toolkit_version,
        "base_model": base_model, **key.as_metadata(),
        "n_blocks": str(blocks.shape[0]), "blocks_sha256": blocks_sha256(blocks),
        "axes": json.dumps(stats.axes, sort_keys=True), "tied": json.dumps(stats.tied, sort_keys=True),
        "unrelaxed": json.dumps(stats.unrelaxed, sort_keys=True),
    }
    tensors = {n: s.detach().to("cpu", torch.float32).contiguous() for n, s in stats.stats.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_stats(path: str | Path, expected: StatsKey | None = None) -> tuple[ActivationStats, dict[str, str]]:
    """Read a stats file; if `expected` is given, refuse (UserError) unless its settings match."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as err:
        raise UserError(f"--stats {path}: cannot read it as a safetensors file ({err})") from err
    if metadata.get("aim_stats") != SCHEMA_VERSION:
        raise UserError(f"--stats {path}: not an AIM statistics file of version {SCHEMA_VERSION} "
                        f"(found {metadata.get('aim_stats')!r}); pass a new --stats path to recalibrate")
    if expected is not None:
        _check_matches(path, metadata, expected)
    stats = ActivationStats(stats=tensors, axes=json.loads(metadata["axes"]),
                            tied=json.loads(metadata["tied"]), unrelaxed=json.loads(metadata["unrelaxed"]))
    return stats, metadata


def _check_matches(path: str | Path, metadata: dict[str, str], expected: StatsKey) -> None:
    differences = [f"{name} {metadata.get(name)!r} in the file vs {wanted!r} requested"
                   for name, wanted in expected.as_metadata().items() if metadata.get(name) != wanted]
    if differences:
        raise UserError(f"--stats {path} was computed with other settings ({'; '.join(differences)}; "
                        f"file made from base {metadata.get('base_model')!r}); pass another --stats path "
                        "or delete it to recalibrate")
