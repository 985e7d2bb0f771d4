"""Compare merge.py's `tokenizer_source: union | <model>` with mergekit 0.1.5 on tiny models.

Builds a tiny Llama family whose tokenizers differ (added pad tokens, a larger and a smaller BPE
vocabulary, a bf16 fine-tune), runs each config below through `merge.py --config` and through
`mergekit-yaml` (a separate virtualenv; never a dependency), and prints, per config: whether
both output tokenizers hold the same tokens at the same ids, and the largest absolute
difference of every tensor, vocabulary rows matched by token (mergekit's ids of tokens added
by the union follow a hash map's order, ours the models' id order).

    python bench/vocab_vs_mergekit.py --mergekit /work/mkvenv/bin/mergekit-yaml --out /tmp/vocab
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.tiny_models import build_finetune, build_llama, build_tokenizer  # noqa: E402

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def build_family(root: Path) -> dict[str, Path]:
    """base (300 tokens), fine-tunes adding [PAD] / <pad>+<|im_end|> / nothing, one bf16, and
    unrelated models with a 320-token (two of them) and a 280-token BPE vocabulary."""
    if (root / "done").exists():
        return {p.name: p for p in root.iterdir() if p.is_dir()}
    base = build_llama(root / "base", seed=0)
    zoo = dict(base=base,
               pad=build_finetune(base, root / "pad", seed=1, added_tokens=("[PAD]",)),
               two=build_finetune(base, root / "two", seed=2, added_tokens=("<pad>", "<|im_end|>")),
               plain=build_finetune(base, root / "plain", seed=3),
               bf=build_finetune(base, root / "bf", seed=4, added_tokens=("[PAD]",),
                                 dtype=torch.bfloat16))
    for name, size, seed in (("big1", 320, 5), ("big2", 320, 6), ("small", 280, 7)):
        build_tokenizer(root / f"tok_{name}", vocab_size=size)
        zoo[name] = build_llama(root / name, seed=seed, tokenizer_from=root / f"tok_{name}")
    (root / "done").touch()
    return zoo


def configs(z: dict[str, Path]) -> dict[str, str]:
    def models(**weights: float) -> str:
        return "".join(f"  - model: {z[m]}\n    parameters: {{weight: {w}}}\n"
                       for m, w in weights.items())
    ta = f"merge_method: task_arithmetic\nbase_model: {z['base']}\nmodels:\n"
    return {
        "ta_union": ta + models(pad=0.7, two=0.5) + "tokenizer_source: union\n",
        "ta_union_bigs": ta + models(big1=0.6, big2=0.4, small=0.3, pad=0.5)
        + "tokenizer_source: union\n",
        "linear_union_no_base": "merge_method: linear\nmodels:\n"
        + models(big1=1.0, big2=2.0, two=1.0) + "tokenizer_source: union\n",
        # weights 1 and 0: the output is `small`'s re-indexed rows themselves (every fill rule)
        "linear_small_rows": f"merge_method: linear\nbase_model: {z['base']}\nmodels:\n"
        + models(small=1.0, base=0.0, big1=0.0, big2=0.0, pad=0.0)
        + "tokenizer_source: union\n",
        "ta_model_source": ta + models(pad=0.7, two=0.5) + f"tokenizer_source: {z['two']}\n",
        "ta_model_source_big": ta + models(pad=0.7, small=0.5) + f"tokenizer_source: {z['big1']}\n",
        "ta_union_tokens": ta + models(pad=0.7, two=0.5) + "tokenizer:\n  source: union\n"
        "  tokens:\n"
        f"    '<|im_start|>': {{source: {{kind: model_token, model: {z['pad']}, "
        "token: '[PAD]'}}\n"
        "    '<pad>': {source: {kind: zero}, force: true}\n"
        f"    '<|im_end|>': {{source: {{kind: model_token, model: {z['base']}, token_id: 5}}, "
        "force: true}\n",
        "ta_union_pad64": ta + models(pad=0.7, two=0.5)
        + "tokenizer: {source: union, pad_to_multiple_of: 64}\n",
        "ties_union_bf16": f"merge_method: ties\nbase_model: {z['base']}\nmodels:\n"
        + "".join(f"  - model: {z[m]}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                  for m in ("bf", "two")) + "tokenizer_source: union\n",
    }


def compare(ours: Path, theirs: Path) -> tuple[bool, float, float]:
    """(same token ids, max |diff| of vocab tensors by token, max |diff| of the others)."""
    from transformers import AutoTokenizer

    vo = AutoTokenizer.from_pretrained(ours).get_vocab()
    vt = AutoTokenizer.from_pretrained(theirs).get_vocab()
    if vo.keys() != vt.keys():
        raise SystemExit(f"{ours}: tokens differ: ours only {sorted(vo.keys() - vt.keys())[:5]}, "
                         f"mergekit only {sorted(vt.keys() - vo.keys())[:5]}")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    tokens = sorted(vo)
    ids_o, ids_t = torch.tensor([vo[t] for t in tokens]), torch.tensor([vt[t] for t in tokens])
    vocab_diff = other_diff = 0.0
    for name in a:
        x, y = a[name].double(), b[name].double()
        if name in VOCAB_TENSORS:
            if x.shape != y.shape:
                raise SystemExit(f"{name}: shapes {list(x.shape)} vs {list(y.shape)}")
            padding = (x[len(tokens):] - y[len(tokens):]).abs().max().item() if len(x) > len(
                tokens) else 0.0
            vocab_diff = max(vocab_diff, (x[ids_o] - y[ids_t]).abs().max().item(), padding)
        else:
            other_diff = max(other_diff, (x - y).abs().max().item())
    return vo == vt, vocab_diff, other_diff


MARKER = "vocab_vs_mergekit.txt"  # marks --out as this script's scratch folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="path of mergekit-yaml")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder")
    args = parser.parse_args()
    marker = args.out / MARKER
    if args.out.exists() and any(args.out.iterdir()) and not marker.exists():
        parser.error(f"--out: {args.out} holds files this script did not write; give a new or "
                     "empty folder (its outputs there are overwritten on every run)")
    args.out.mkdir(parents=True, exist_ok=True)
    marker.write_text("scratch folder of bench/vocab_vs_mergekit.py; rewritten on every run\n")
    zoo = build_family(args.out / "zoo")
    for name, text in configs(zoo).items():
        path = args.out / f"{name}.yml"
        path.write_text(text + "dtype: float32\n")
        ours, theirs = args.out / f"ours_{name}", args.out / f"mergekit_{name}"
        subprocess.run([sys.executable, str(REPO / "merge.py"), "--config", str(path),
                        "--save_path", str(ours), "--overwrite"], check=True,
                       capture_output=True)
        subprocess.run([args.mergekit, str(path), str(theirs), "--allow-crimes"], check=True,
                       capture_output=True)
        same_ids, vocab_diff, other_diff = compare(ours, theirs)
        print(f"{name:22s} same ids: {same_ids!s:5s}  max|diff| vocab rows {vocab_diff:.3g}, "
              f"other tensors {other_diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
