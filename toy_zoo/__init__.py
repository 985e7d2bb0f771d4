"""Toy model zoo: a tiny Llama base and three skill experts, trained on CPU in minutes.

`python -m toy_zoo build --out zoo/` (see `toy_zoo.build`). Models are ordinary HF folders and
the benchmarks are lm-eval tasks (`toy_instruct`, `toy_math`, `toy_code`, `toy_ppl`).
"""
