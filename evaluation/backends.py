"""Model backends for lm-eval: Hugging Face transformers (`hf`) or vLLM (`vllm`).

`auto` picks vLLM only when it is installed and a CUDA GPU is present; everything else runs on
`hf`. With `--n_gpu N > 1`, hf splits the weights over the GPUs in one process
(`parallelize=True`), and vLLM runs tensor parallel (or data parallel, one replica per GPU,
which needs `ray`).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from checkpoints.errors import UserError

log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_backend(requested: str, *, vllm_installed: bool | None = None,
                   cuda: bool | None = None) -> str:
    """Resolve `auto|hf|vllm` to `hf` or `vllm`; explicit `vllm` without vllm or a GPU is an error."""
    if vllm_installed is None:
        vllm_installed = importlib.util.find_spec("vllm") is not None
    if cuda is None:
        cuda = _cuda_available()
    if requested == "auto":
        return "vllm" if vllm_installed and cuda else "hf"
    if requested == "vllm" and not vllm_installed:
        raise UserError('--backend vllm: vllm is not installed (pip install "lm-eval[vllm]"), '
                        "or use --backend hf")
    if requested == "vllm" and not cuda:
        raise UserError("--backend vllm: needs a CUDA GPU; use --backend hf on this machine")
    if requested not in ("hf", "vllm"):
        raise UserError(f"--backend {requested}: choose auto, hf or vllm")
    return requested


def parse_batch_size(text: str | int) -> int | str:
    """`auto`, `auto:N` or a positive int, as lm-eval accepts."""
    if isinstance(text, int) or str(text).isdigit():
        if int(text) < 1:
            raise UserError(f"--batch_size {text}: must be >= 1 or auto")
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise UserError(f"--batch_size {text}: use an integer, auto or auto:N")


def check_model(model: str) -> None:
    """Fail early on a model that is neither an existing folder nor shaped like a hub id, on a
    folder whose checkpoint headers are unreadable, or on a hub id while the Hub is unreachable
    (loading would retry for about 25 s first)."""
    from huggingface_hub import constants

    from checkpoints.hub import hub_unreachable

    if Path(model).is_dir():   # headers and file sizes: the checks merge.py makes on its inputs
        from checkpoints.checkpoint import CheckpointReader

        CheckpointReader(Path(model), f"--model {model}")
        return
    if Path(model).exists():
        return
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"--model {model}: no such folder, and not a hub id of the form org/name")
    down = hub_unreachable()
    if down and not constants.HF_HUB_OFFLINE:  # offline mode reads the cache at once
        raise UserError(f"--model {model}: no such folder, and the Hugging Face Hub is unreachable "
                        f"({down}); pass a local folder, or set HF_HUB_OFFLINE=1 to use a cached copy")


def build_lm(model: str, *, backend: str, device: str, dtype: str, batch_size: int | str,
             max_model_len: int | None, n_gpu: int, vllm_parallel: str, seed: int):
    """Load the model once as an lm-eval LM object, reused for every benchmark of a run."""
    try:
        if backend == "vllm":
            from lm_eval.models.vllm_causallms import VLLM

            size_key = "tensor_parallel_size" if vllm_parallel == "tensor" else "data_parallel_size"
            extra = {"max_model_len": max_model_len} if max_model_len else {}
            return VLLM(pretrained=model, dtype=dtype, batch_size=batch_size, seed=seed,
                        **{size_key: n_gpu}, **extra)
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, device=device, dtype=dtype, batch_size=batch_size,
                    max_length=max_model_len, parallelize=n_gpu > 1)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model {model}: could not load it ({first}); when offline, pass a "
                        "local folder") from err


def autocast_generation(lm, dtype: str | None, device: str):
    """Make `lm.generate_until` run under `torch.autocast(dtype)` (returns `lm`).

    Generation's matmuls then run in `dtype` (bf16 is ~6x faster than fp32 on CPUs with
    AVX512-BF16, and the prompt's forward pass dominates short answers), while the weights stay
    as loaded and loglikelihood / perplexity requests are scored in full precision.
    """
    if not dtype:
        return lm
    import functools

    import torch

    original = lm.generate_until

    @functools.wraps(original)
    def generate_until(*args, **kwargs):
        with torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)):
            return original(*args, **kwargs)

    lm.generate_until = generate_until
    return lm
