"""A zoo of a real pretrained LLM (SmolLM2-135M, installed offline from the package registry)
and three experts fine-tuned from it on CPU: instruction following, math, code."""
