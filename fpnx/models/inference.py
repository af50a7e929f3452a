"""Running the network fast and safely: folded norms, channels_last, autocast, and the fp16 overflow guard."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .layers import fold_norms

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def optimize_for_inference(model: torch.nn.Module, *, channels_last: bool = True) -> torch.nn.Module:
    """Fold frozen norms into convs and use channels_last (what oneDNN and cuDNN run fastest), in place."""
    fold_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Without AVX-512 BF16 or AMX, oneDNN emulates bf16 and it runs slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass
class Forward:
    outputs: dict[str, torch.Tensor]
    fell_back_to_fp32: bool = False


@torch.no_grad()
def forward(model: torch.nn.Module, batch: torch.Tensor, precision: str = "fp32") -> Forward:
    """``model(batch)`` in ``precision``; a reduced-precision result with NaN/inf is recomputed in fp32.

    fp16 overflows at 65504, where fp32 does not: rather than store inf or NaN, the batch is run again in
    fp32 (and the caller is told), so reduced precision never gives non-finite values fp32 would not give.
    """
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(batch.device, precision):
        outputs = model(batch)
    if PRECISIONS[precision] is not None and not all(bool(torch.isfinite(t).all()) for t in outputs.values()):
        return Forward({k: v.float() for k, v in model(batch).items()}, fell_back_to_fp32=True)
    return Forward(outputs)
