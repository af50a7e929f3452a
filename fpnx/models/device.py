"""Where the network runs: ``--device`` resolved against what this machine has."""

from __future__ import annotations

import torch

from ..errors import UsageError


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; anything else is checked to exist here (UsageError if not)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not _mps_available():
        raise UsageError(f"device {device}: MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return resolved


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
