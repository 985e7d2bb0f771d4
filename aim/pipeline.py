"""AIM end to end: settings from flags, statistics (calibrate or reuse), streaming relaxation.

Both entry modes use this module: `performAIM.py` relaxes a saved merged checkpoint
(`relax_checkpoint`), and `merge.py --aim` passes a `Relaxer` to the merge runner as its
per-tensor hook, so the merged model is relaxed in the same streaming pass. Either way the
merged model is never loaded as a module: only the base model is, once, for calibration.
"""
from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aim.relax import MODES, relax, relaxation_factors
from aim.stats_io import (ActivationStats, StatsKey, base_fingerprint, file_sha256, load_stats,
                          save_stats)
from checkpoints.checkpoint import (HEAD_SUFFIXES, TOKENIZER_FILES, CheckpointReader,
                                    ShardedWriter, TensorInfo, copy_model_files,
                                    dtype_config_update, dtype_name, finite, has_tokenizer,
                                    non_finite_parameters, parse_dtype, parse_size,
                                    resolve_model_dir)
from checkpoints.errors import UserError, check_writable, writing
from checkpoints.output import staged_output
from checkpoints.record import TOOLKIT_VERSION, read_record, write_model_card, write_record
from checkpoints.rows import AlignedRows, row_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AimSettings:
    omegas: tuple[float, ...] = (0.4,)
    mode: str = "aim"
    calib_data: str = "mit-han-lab/pile-val-backup"
    calib_samples: int = 256
    block_size: int = 512
    calib_seed: int = 42
    calib_dtype: str = "auto"
    batch_size: int = 1
    stats: str | None = None
    relax_tied_lm_head: bool = False


def add_aim_arguments(parser: argparse.ArgumentParser, *, several_omegas: bool) -> None:
    """AIM flags shared by performAIM.py and merge.py --aim."""
    g = parser.add_argument_group("Activation-Informed Merging")
    omega_help = ("fraction of the merged delta kept on the base's most important input channel: "
                  "1 = no change, lower = more of the base kept on important channels "
                  "(paper: 0.4; 0.2-0.6 recommended)")
    if several_omegas:
        omega_help += "; several values (0.2,0.4,0.6) write one output each, calibrating once"
    g.add_argument("--omega", default="0.4", help=omega_help + " (default 0.4)")
    g.add_argument("--aim_mode", choices=MODES, default="aim",
                   help="aim: per-channel importance; channel_blind: each module's importance "
                        "replaced by its mean (ablation); uniform: one global factor equal to "
                        "AIM's mean relaxation (ablation)")
    g.add_argument("--calib_data", default=AimSettings.calib_data,
                   help="calibration texts: an HF dataset id (validation split, 'text' column), a "
                        "local .txt/.jsonl/.json/.parquet file or folder, or 'builtin' (offline "
                        "text shipped with Python)")
    g.add_argument("--calib_samples", type=int, default=256, help="documents accepted")
    g.add_argument("--block_size", type=int, default=512,
                   help="tokens per calibration block (and longest document kept)")
    g.add_argument("--calib_seed", type=int, default=42, help="shuffle seed of the documents")
    g.add_argument("--calib_dtype", default="auto",
                   help="dtype of the calibration forward pass (auto: bfloat16 on CUDA, float32 "
                        "on CPU); statistics are always accumulated in float32")
    g.add_argument("--batch_size", type=int, default=1, help="calibration blocks per forward")
    g.add_argument("--stats", default=None,
                   help="activation statistics file: reused when it exists and matches the base "
                        "and calibration settings, else computed and saved there")
    g.add_argument("--aim_relax_tied_lm_head", action="store_true",
                   help="also relax a tied lm_head (this changes the input embedding too)")


def settings_from_args(args: argparse.Namespace) -> AimSettings:
    try:
        omegas = tuple(float(v) for v in str(args.omega).split(",") if v.strip())
    except ValueError:
        raise UserError(f"--omega: expected numbers like 0.4 or 0.2,0.4, got {args.omega!r}")
    if not omegas:
        raise UserError("--omega: give at least one value")
    if len(set(omegas)) < len(omegas):
        log.info("--omega: %s repeats a value; each distinct value is written once", args.omega)
        omegas = tuple(dict.fromkeys(omegas))
    bad = [w for w in omegas if not 0.0 <= w <= 1.0]
    if bad:
        raise UserError(f"--omega: {bad[0]} is outside [0, 1]; 1 keeps the merged model, 0 "
                        "restores the base on the most important channels")
    for flag, value in (("--calib_samples", args.calib_samples), ("--block_size", args.block_size),
                        ("--batch_size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if args.calib_dtype != "auto":
        parse_dtype(args.calib_dtype, "--calib_dtype")
    return AimSettings(omegas=omegas, mode=args.aim_mode, calib_data=args.calib_data,
                       calib_samples=args.calib_samples, block_size=args.block_size,
                       calib_seed=args.calib_seed, calib_dtype=args.calib_dtype,
                       batch_size=args.batch_size, stats=args.stats,
                       relax_tied_lm_head=args.aim_relax_tied_lm_head)


def _calib_dtype(settings: AimSettings, device: torch.device) -> torch.dtype:
    if settings.calib_dtype != "auto":
        return parse_dtype(settings.calib_dtype, "--calib_dtype")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def obtain_stats(base_dir: Path, base_id: str, settings: AimSettings,
                 device: torch.device) -> tuple[ActivationStats, dict]:
    """Reuse `settings.stats` when it matches, else calibrate the base (and save if asked).

    Returns the statistics and a record of where they came from (for the recipe file).
    """
    dtype = _calib_dtype(settings, device)
    key = StatsKey(base_fingerprint=base_fingerprint(base_dir), calib_data=settings.calib_data,
                   calib_samples=settings.calib_samples, block_size=settings.block_size,
                   calib_seed=settings.calib_seed, dtype=dtype_name(dtype))
    record = {"base_model": base_id, **{k: v for k, v in asdict(settings).items()
                                        if k not in ("omegas", "stats")},
              "calib_dtype": dtype_name(dtype)}
    if settings.stats and Path(settings.stats).exists():
        stats, metadata = load_stats(settings.stats, key)
        log.info("AIM: reusing statistics from %s (%s blocks)", settings.stats, metadata.get("n_blocks"))
        return stats, {**record, "stats_file": str(settings.stats),
                       "stats_sha256": file_sha256(settings.stats), "n_blocks": metadata.get("n_blocks")}
    if settings.stats:
        check_writable(Path(settings.stats).parent, "--stats")
    stats, blocks = _calibrate(base_dir, settings, device, dtype)
    record["n_blocks"] = int(blocks.shape[0])
    if settings.stats:
        with writing(settings.stats, "--stats"):
            save_stats(settings.stats, stats, key, base_model=base_id, blocks=blocks,
                       toolkit_version=TOOLKIT_VERSION)
        record.update(stats_file=str(settings.stats), stats_sha256=file_sha256(settings.stats))
    return stats, record


def _calibrate(base_dir: Path, settings: AimSettings, device: torch.device,
               dtype: torch.dtype) -> tuple[ActivationStats, torch.Tensor]:
    from aim.collect import collect_stats, load_base_for_calibration
    from calibration.blocks import build_blocks
    from calibration.sources import load_texts

    if not has_tokenizer(base_dir):
        raise UserError(f"--pretrained_model_name {base_dir}: no tokenizer files (tokenizer.json "
                        "or tokenizer.model); calibration needs the base model's tokenizer")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except Exception as err:  # noqa: BLE001 - a broken tokenizer folder is a user problem
        raise UserError(f"--pretrained_model_name {base_dir}: cannot load its tokenizer "
                        f"({str(err).strip().splitlines()[0][:160] if str(err).strip() else err!r})")
    texts = load_texts(settings.calib_data)
    blocks = build_blocks(texts, tokenizer, n_samples=settings.calib_samples,
                          block_size=settings.block_size, seed=settings.calib_seed)
    model = load_base_for_calibration(str(base_dir), device, dtype)
    bad = non_finite_parameters(model)
    if bad:
        raise UserError(f"--pretrained_model_name {base_dir}: tensor {bad[0]} contains NaN or inf; "
                        "the checkpoint is corrupt or was saved in too narrow a dtype")
    try:
        stats = collect_stats(model, blocks, batch_size=settings.batch_size)
    finally:
        del model
    return stats, blocks


class Relaxer:
    """The per-tensor AIM step for one omega: `relaxer(name, merged, base) -> tensor`."""

    def __init__(self, stats: ActivationStats, shapes: dict[str, tuple[int, ...]], omega: float,
                 mode: str, relax_tied_lm_head: bool):
        by_name, axes = stats.for_relaxation(relax_tied_lm_head)
        missing = sorted(set(by_name) - set(shapes))
        if missing:
            raise UserError(f"--stats: statistics name {missing[0]} which the merged model lacks; "
                            "they belong to another architecture")
        bad = sorted(n for n, s in by_name.items() if not torch.isfinite(s).all())
        if bad:
            raise UserError(f"AIM statistics of {bad[0]} contain NaN or inf (the calibration "
                            "overflowed in --calib_dtype, or a bad --stats file); calibrate in "
                            "float32 with a new --stats path")
        self.axes = axes
        self.factors = relaxation_factors(by_name, shapes, axes, omega, mode)
        self.omega = omega
        self.relaxed = 0

    def __contains__(self, name: str) -> bool:
        return name in self.factors

    def __call__(self, name: str, merged: torch.Tensor, base: torch.Tensor,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Relax `merged` toward `base`; `rows` says which rows of the tensor they are (a chunk
        of a large tensor; None: all of it)."""
        if name not in self.factors:
            return merged
        if rows is None or rows[0] == 0:
            self.relaxed += 1
        factor = self.factors[name]
        if self.axes[name] == 0 and rows is not None:
            factor = factor[rows[0]:rows[1]]
        return relax(merged, base, factor, self.axes[name])


def check_same_tensors(merged: CheckpointReader, base: CheckpointReader) -> None:
    """Same tensors and shapes in merged and base (a tied head may be absent on either side;
    a merged vocab tensor may have extra rows)."""
    def core(reader):
        return {n for n in reader.info if not (n.endswith(HEAD_SUFFIXES) and
                                               (merged.tie_word_embeddings or base.tie_word_embeddings))}
    diff = sorted(core(merged) ^ core(base))
    if diff:
        raise UserError(f"--merged_model and --pretrained_model_name hold different tensors "
                        f"({len(diff)} differ, e.g. {diff[0]}); pass the base the merge started from")
    for name in sorted(set(merged.info) & set(base.info)):
        m, b = merged.info[name].shape, base.info[name].shape
        if m != b and not (len(m) == 2 and m[1:] == b[1:] and m[0] > b[0]):
            raise UserError(f"{name}: merged shape {list(m)} does not fit the base's {list(b)}; "
                            "pass the base the merge started from")


def check_rows_by_position(merged: CheckpointReader) -> None:
    """Refuse a merge whose vocabulary a config built from tokenizers (rows re-indexed by token,
    merging_methods/token_vocab.py): the base's rows cannot be lined up with it here."""
    record = read_record(merged.folder)
    if "tokenizer" in record or record.get("tokenizer_source") not in (None, "base"):
        raise UserError(f"--merged_model: {merged.label} was merged with a vocabulary built from "
                        "tokenizers (tokenizer_source/tokenizer in its merge_recipe.yaml), whose "
                        "rows the base's cannot be lined up with here; relax it during the merge "
                        "instead (merge.py --config ... --aim)")


def check_layers_in_place(merged: CheckpointReader) -> None:
    """Refuse a merge whose recipe says its layers are not the base's layers of the same index
    (slices that move layers, a passthrough stack): relaxing each toward the base's layer of
    that name would pull it toward the wrong layer."""
    if read_record(merged.folder).get("merge", {}).get("base_layers_moved"):
        raise UserError(f"--merged_model: {merged.label}'s layers do not sit where the base's do "
                        "(slices that move or stack layers, base_layers_moved in its "
                        "merge_recipe.yaml), so they cannot be relaxed toward the base's layers "
                        "of the same index; use merge.py --aim with slices that keep the base's "
                        "layers in place")


def _base_rows_if_fewer(base: CheckpointReader, merged: CheckpointReader, name: str) -> int | None:
    """The base tensor's row count when the merged one has more rows (a grown vocabulary)."""
    if name not in base.info:
        return None
    rows = base.info[name].shape[:1]
    return rows[0] if rows and rows[0] < merged.info[name].shape[0] else None


def output_paths(save_path: str, omegas: tuple[float, ...]) -> list[Path]:
    """One output per omega: SAVE_PATH itself, or SAVE_PATH_omega<value> for several."""
    if len(omegas) == 1:
        return [Path(save_path)]
    paths = [Path(f"{save_path}_omega{w:g}") for w in omegas]
    if len(set(paths)) < len(paths):
        raise UserError(f"--omega: values {', '.join(map(repr, omegas))} give the same output "
                        "folder name (6 significant digits); give values that differ there")
    return paths


def relax_checkpoint(merged_id: str, base_id: str, save_path: str, settings: AimSettings,
                     device: torch.device, *, out_dtype: str | None, max_shard_size: str,
                     overwrite: bool) -> list[Path]:
    """performAIM: relax a saved merged checkpoint for every omega, reading each tensor once."""
    merged = CheckpointReader(resolve_model_dir(merged_id, "--merged_model"), merged_id)
    base_dir = resolve_model_dir(base_id, "--pretrained_model_name")
    base = CheckpointReader(base_dir, base_id)
    dtype = parse_dtype(out_dtype) if out_dtype else merged.stored_dtype
    outputs = output_paths(save_path, settings.omegas)
    check_rows_by_position(merged)
    check_layers_in_place(merged)
    check_same_tensors(merged, base)
    stats, stats_record = obtain_stats(base_dir, base_id, settings, device)
    shapes = {n: i.shape for n, i in merged.info.items()}
    relaxers = [Relaxer(stats, shapes, w, settings.mode, settings.relax_tied_lm_head)
                for w in settings.omegas]
    infos = {n: TensorInfo(i.shape, dtype if i.dtype.is_floating_point else i.dtype)
             for n, i in merged.info.items()}
    with ExitStack() as stack, torch.inference_mode():
        inputs = [merged.folder, base.folder, settings.stats, settings.calib_data]
        folders = [stack.enter_context(staged_output(out, overwrite, inputs)) for out in outputs]
        writers = [ShardedWriter(f, infos, parse_size(max_shard_size)) for f in folders]
        for name in tqdm(merged.names, desc="AIM relax", unit="tensor"):
            # row chunks (relaxation is per element); a base with fewer vocab rows than the
            # merged model gets mean rows (ALGORITHMS.md §13.3), read chunk by chunk
            base_rows = AlignedRows(base, name, _base_rows_if_fewer(base, merged, name), "mean")
            for rows in row_ranges(infos[name].shape, split=True):
                tensor = finite(merged.get(name, rows), merged.label, name)
                if name in relaxers[0]:
                    m = tensor.to(device, torch.float32)
                    b = finite(base_rows.get(rows), base.label, name).to(device, torch.float32)
                    results = [r(name, m, b, rows) for r in relaxers]
                else:
                    results = [tensor] * len(relaxers)
                for writer, result in zip(writers, results):
                    writer.add(name, result.to(infos[name].dtype), rows[0] if rows else 0)
        for writer, folder, relaxer in zip(writers, folders, relaxers):
            writer.close()
            copy_model_files(merged.folder, folder,
                             config_updates=dtype_config_update(merged.config, dtype))
            if not has_tokenizer(merged.folder):
                log.warning("--merged_model has no tokenizer files; copying the base's")
                copy_model_files(base.folder, folder, names=TOKENIZER_FILES)
            record = {**read_record(merged.folder), "aim": {
                **stats_record, "omega": relaxer.omega, "merged_model": merged_id,
                "relaxed_tensors": relaxer.relaxed}}
            record.pop("versions", None)
            record.pop("created", None)
            write_record(folder, record)
            write_model_card(folder, record)
    log.info("AIM: relaxed %d tensors, %d passed through unchanged; %s",
             relaxers[0].relaxed, len(merged.names) - relaxers[0].relaxed,
             stats.relaxation_summary(settings.relax_tied_lm_head))
    return outputs



def inline_hook_factory(settings: AimSettings, device: torch.device):
    """For `merge.py --aim`: after preflight, get the base's statistics and return the hook."""
    def make(inputs) -> tuple[Relaxer, dict]:
        base = inputs.base
        stats, record = obtain_stats(base.folder, base.label, settings, device)
        relaxer = Relaxer(stats, {n: i.shape for n, i in inputs.plan.out_infos.items()},
                          settings.omegas[0], settings.mode, settings.relax_tied_lm_head)
        return relaxer, {"aim": {**record, "omega": settings.omegas[0]}}
    return make
