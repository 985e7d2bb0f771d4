"""Time performAIM.py on a synthetic family: calibration forward + relaxation, then relaxation
alone with the saved statistics, printing wall time and peak RSS of each run.

The family from bench/make_family.py has no tokenizer; a small byte-level BPE tokenizer is
trained on the builtin calibration texts and saved into the base and the merged folder.

    python bench/bench_aim.py --family bench_out/family --merged bench_out/work/ours_task_arithmetic
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_merge import REPO, run_child  # noqa: E402


def save_byte_level_tokenizer(folders: list[Path], vocab_size: int = 1000) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from calibration.sources import builtin_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(builtin_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")
    for folder in folders:
        hf.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--merged", required=True, help="a merged checkpoint of that family")
    ap.add_argument("--calib_samples", type=int, default=8)
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--work", default="bench_out/work")
    args = ap.parse_args(argv)
    base, merged = Path(args.family).resolve() / "base", Path(args.merged).resolve()
    work = Path(args.work).resolve()
    save_byte_level_tokenizer([base, merged])
    stats = work / "aim_stats.safetensors"
    stats.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "performAIM.py"), "--merged_model", str(merged),
           "--pretrained_model_name", str(base), "--omega", "0.4", "--calib_data", "builtin",
           "--calib_samples", str(args.calib_samples), "--block_size", str(args.block_size),
           "--stats", str(stats), "--device", "cpu", "--overwrite",
           "--save_path", str(work / "aim_out")]
    full = run_child(cmd)
    relax_only = run_child(cmd)
    print("| run | wall s | peak RSS GiB |\n|---|---|---|")
    print(f"| calibrate ({args.calib_samples} docs, block {args.block_size}) + relax | "
          f"{full[0]:.1f} | {full[1]:.2f} |")
    print(f"| relax only (stats reused) | {relax_only[0]:.1f} | {relax_only[1]:.2f} |")
    print(f"| calibration phase (difference) | {full[0] - relax_only[0]:.1f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
