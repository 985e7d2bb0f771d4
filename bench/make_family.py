"""Write a synthetic Llama-architecture checkpoint family (base + N experts) for benchmarks.

Tensors are generated and written one shard at a time, so building a multi-GB family needs
little memory. Experts are the base plus small seeded noise (like real fine-tunes).

    python bench/make_family.py --out bench_out/family --hidden 2048 --layers 8 \
        --intermediate 5632 --vocab 32000 --experts 3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.checkpoint import ShardedWriter, TensorInfo, parse_dtype, parse_size  # noqa: E402


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int,
                 kv_heads_ratio: int = 1) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a LlamaForCausalLM checkpoint."""
    kv = hidden // kv_heads_ratio
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def base_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)


def write_model(folder: Path, shapes: dict, dtype: torch.dtype, shard_bytes: int,
                make: callable, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    infos = {n: TensorInfo(s, dtype) for n, s in shapes.items()}
    writer = ShardedWriter(folder, infos, shard_bytes)
    for name, shape in shapes.items():
        writer.add(name, make(name, shape).to(dtype))
    writer.close()
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shard_size", default="400MB")
    ap.add_argument("--noise", type=float, default=0.05, help="expert delta relative size")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtype = parse_dtype(args.dtype)
    shapes = llama_shapes(args.hidden, args.layers, args.intermediate, args.vocab)
    heads = max(1, args.hidden // 128)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": args.vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2,
    }
    out = Path(args.out)
    shard_bytes = parse_size(args.shard_size)

    def make_base(name, shape):
        return base_tensor(name, shape, torch.Generator().manual_seed(hash_name(name)))

    write_model(out / "base", shapes, dtype, shard_bytes, make_base, config)
    for e in range(1, args.experts + 1):
        def make_expert(name, shape, e=e):
            base = make_base(name, shape)
            gen = torch.Generator().manual_seed(hash_name(name) + 7919 * e)
            return base + args.noise * base.std() * torch.randn(shape, generator=gen)

        write_model(out / f"expert{e}", shapes, dtype, shard_bytes, make_expert, config)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"wrote base + {args.experts} experts of {n_params / 1e6:.0f}M parameters to {out}")
    return 0


def hash_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


if __name__ == "__main__":
    raise SystemExit(main())
