"""The device a command computes on, resolved once from its `--device` flag."""
from __future__ import annotations

import torch

from checkpoints.errors import UserError


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """'auto' -> cuda if available else cpu; a cuda request without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag}: unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag}: {name} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag}: {name} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise UserError(f"{flag}: unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
