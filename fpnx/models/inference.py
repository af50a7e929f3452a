"""Running the network fast and safely: folded norms, channels_last, autocast, the fp16 overflow guard, and
cutting each image's valid region out of a padded batch's outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .layers import fold_norms
from .shapes import map_size

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOAT16_MAX = 65504.0


def optimize_for_inference(model: torch.nn.Module, *, channels_last: bool = True) -> torch.nn.Module:
    """Fold frozen norms into convs and use channels_last (what oneDNN and cuDNN run fastest), in place."""
    fold_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (a key of :data:`PRECISIONS`, checked by the caller's options); fp32: nothing."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Without AVX-512 BF16 or AMX, oneDNN emulates bf16 and it runs slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_has_native_fp16() -> bool:
    """Without AMX-FP16, oneDNN emulates fp16 and it runs slower than fp32."""
    probe = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    return bool(probe()) if probe is not None else False


@dataclass
class ForwardResult:
    """The outputs of one forward pass, and whether reduced precision overflowed and fp32 was used instead."""

    outputs: dict[str, torch.Tensor]
    fell_back_to_fp32: bool = False


@torch.no_grad()
def forward(model: torch.nn.Module, batch: torch.Tensor, precision: str = "fp32") -> ForwardResult:
    """``model(batch)`` in ``precision``; a reduced-precision result with NaN/inf is recomputed in fp32.

    fp16 overflows at 65504, where fp32 does not: rather than store inf or NaN, the batch is run again in
    fp32 (and the caller is told), so reduced precision never gives non-finite values fp32 would not give.
    """
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(batch.device, precision):
        outputs = model(batch)
    if PRECISIONS[precision] is not None and not all(bool(torch.isfinite(t).all()) for t in outputs.values()):
        return ForwardResult({k: v.float() for k, v in model(batch).items()}, fell_back_to_fp32=True)
    return ForwardResult(outputs)


def valid_regions(
    outputs: Mapping[str, torch.Tensor],
    index: int,
    input_size: tuple[int, int],
    strides: Mapping[str, int],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], int]:
    """Image ``index``'s maps at the levels of ``strides``, cut to its unpadded input and cast to ``dtype``.

    Each level keeps ``map_size(*input_size, stride)``: the part of the padded batch's map that covers the
    image. The cast happens where the outputs are (on the device). Values beyond float16's range are clamped
    to +-65504 rather than stored as inf; returns the crops and how many values were clamped.
    """
    crops, clamped = {}, 0
    for name, stride in strides.items():
        height, width = map_size(*input_size, stride)
        region = outputs[name][index, :, :height, :width].float()
        if dtype == torch.float16:
            overflow = region.abs() > FLOAT16_MAX
            if bool(overflow.any()):
                clamped += int(overflow.sum())
                region = region.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        crops[name] = region.to(dtype).contiguous()
    return crops, clamped
