"""Running the network fast and safely: folded norms, channels_last, autocast, the fp16 overflow guard, and
cutting each image's valid region out of a padded batch's outputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .layers import fold_norms
from .shapes import map_size

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": None,
}  # fmt: skip
"""Autocast dtype of each ``--precision``. ``fp32`` is IEEE fp32 everywhere (CUDA's TF32 kept off); ``tf32``
lets CUDA convolutions and matmuls use TF32 (faster, ~1e-3 relative); on the CPU it is fp32."""
FLOAT16_MAX = 65504.0


def optimize_for_inference(model: torch.nn.Module, *, channels_last: bool = True) -> torch.nn.Module:
    """Fold frozen norms into convs and use channels_last (what oneDNN and cuDNN run fastest), in place."""
    fold_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Run in ``precision`` (a key of :data:`PRECISIONS`, checked by the caller's options): autocast for bf16 and
    fp16; on CUDA, TF32 switched on for ``tf32`` only and off otherwise (PyTorch allows it for convolutions by
    default, which changes fp32 results around 1e-3), and put back as it was afterwards."""
    device_type = torch.device(device).type
    dtype = PRECISIONS[precision]
    with _tf32(precision == "tf32") if device_type == "cuda" else contextlib.nullcontext():
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            yield


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for CUDA matmuls and cuDNN, put back as it was. Through the ``fp32_precision`` flags where
    PyTorch has them: once any of them was set (by the user, or ``set_float32_matmul_precision``), reading the
    older ``allow_tf32`` flags raises."""
    flags = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    if all(hasattr(flag, "fp32_precision") for flag in flags):
        saved = [flag.fp32_precision for flag in flags]
        for flag in flags:
            flag.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            for flag, value in zip(flags, saved):
                flag.fp32_precision = value
        return
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved_legacy = conv.allow_tf32, matmul.allow_tf32
    conv.allow_tf32 = matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        conv.allow_tf32, matmul.allow_tf32 = saved_legacy


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
    A channels_last model takes the batch in either layout (its first convolution converts it).
    """
    outputs = run_model(model, batch, precision)
    if PRECISIONS[precision] is not None and not bool(all_finite(outputs)):
        return ForwardResult(run_model(model, batch, "fp32"), fell_back_to_fp32=True)
    return ForwardResult(outputs)


def run_model(model: torch.nn.Module, batch: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """``model(batch)`` in ``precision``, without the overflow check (outputs of bf16/fp16 may be half floats)."""
    with torch.no_grad(), autocast(batch.device, precision):
        return model(batch)


def all_finite(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A 0-d boolean tensor on the outputs' device: no NaN or inf anywhere (reading it waits for the device)."""
    # the extremes of each map (NaN propagates into them), read in memory order: 2 ms instead of 52 for the bf16
    # maps of one 800x1066 image on the CPU (measured), where isfinite() makes a boolean copy of every map
    extremes = [value.float() for tensor in outputs.values() for value in torch.aminmax(_in_memory_order(tensor))]
    return torch.isfinite(torch.stack(extremes)).all()


def valid_regions(
    outputs: Mapping[str, torch.Tensor],
    index: int,
    input_size: tuple[int, int],
    strides: Mapping[str, int],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Image ``index``'s maps at the levels of ``strides``, cut to its unpadded input and cast to ``dtype``.

    Each level keeps ``map_size(*input_size, stride)``: the part of the padded batch's map that covers the
    image, as a ``(C, h, w)`` tensor where the outputs are (on the device): contiguous where the dtype changes,
    else possibly a view of the outputs. For float16, values beyond its range are stored as +-65504 rather than
    inf (NaN stays NaN); on the CPU only crops that a quick min/max finds holding such values (or NaN) take that
    pass, on a GPU every crop does (reading a min/max would wait for the device). Returns the crops and a 0-d
    tensor counting the values that became +-65504 that way (read it when the device is done).
    """
    crops, clamped = {}, []
    for name, stride in strides.items():
        height, width = map_size(*input_size, stride)
        region = _crop(outputs[name], index, height, width, dtype)
        if dtype == torch.float16 and _may_hold_inf_or_nan(region):
            clamped.append(torch.isinf(region).sum())
            region.nan_to_num_(nan=float("nan"), posinf=FLOAT16_MAX, neginf=-FLOAT16_MAX)
        crops[name] = region
    device = next(iter(outputs.values())).device
    return crops, torch.stack(clamped).sum() if clamped else torch.zeros((), dtype=torch.int64, device=device)


def _channels_innermost_on_cpu(output: torch.Tensor) -> bool:
    """A CPU map stored channels_last (what the model gives there): per-channel work over it in NCHW order runs
    many times slower than in its own order (measured for P2 at 800x1066: crop + cast 67 ms, mean 56 ms, max
    105 ms; in its own order 15, 3 and 4 ms)."""
    return output.device.type == "cpu" and output.dim() == 4 and output.stride(1) == 1 and output.shape[1] > 1


def _crop(output: torch.Tensor, index: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Image ``index``'s top-left ``(C, height, width)`` of ``output`` in ``dtype``: a new contiguous tensor where
    the dtype changes; where it does not, a view (on the CPU the writer thread copies it, beside the forward)."""
    channels = output.shape[1]
    if _channels_innermost_on_cpu(output) and dtype != output.dtype and channels * height * width > DIRECT_CROP:
        # cast in its own order, then transposed
        pixels = output[index].permute(1, 2, 0)[:height, :width].to(dtype).contiguous()
        return _transposed(pixels.view(-1, channels)).view(channels, height, width)
    return output[index, :, :height, :width].to(dtype, memory_format=torch.contiguous_format)


# Crops of up to this many values are cast and transposed in one copy: P5 and P6 (up to ~270k values at the default
# sizes) take ~0.7 of the time of the passes below (in the pipeline, ~0.35 ms less of the main thread per image);
# from P4 (640k values up) the passes win (measured on cache-cold maps)
DIRECT_CROP = 1 << 19
TRANSPOSE_PIECE = 2048  # rows per piece: a piece and its transpose stay in the cache
TRANSPOSE_SPLIT = 1 << 20  # values above which the other half goes to a helper thread
_helpers: dict[int, ThreadPoolExecutor] = {}  # by process: a forked child inherits the executor, not its thread


def _transposed(rows: torch.Tensor) -> torch.Tensor:
    """``rows.t().contiguous()`` of a CPU ``(N, C)`` tensor, in pieces of ``TRANSPOSE_PIECE`` rows, and for a
    large one with its second half on a helper thread where there is another core. PyTorch's transposing copy
    runs on one thread and far below the memory's speed on the large maps (P2 of an 800x1066 image at float16:
    30 ms in one piece, 21-26 in pieces, 13-14 in pieces on two threads, measured on two cores)."""
    count, channels = rows.shape
    result = torch.empty((channels, count), dtype=rows.dtype)

    def pieces(start: int, stop: int) -> None:
        for first in range(start, stop, TRANSPOSE_PIECE):
            last = min(first + TRANSPOSE_PIECE, stop)
            result[:, first:last] = rows[first:last].t().contiguous()

    if rows.numel() < TRANSPOSE_SPLIT or (os.cpu_count() or 1) < 2:
        pieces(0, count)
        return result
    helper = _helpers.get(os.getpid())
    if helper is None:
        helper = _helpers[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="fpnx-transpose")
    half = count // 2
    second = helper.submit(pieces, half, count)
    pieces(0, half)
    second.result()
    return result


def pooled_vectors(
    outputs: Mapping[str, torch.Tensor], index: int, input_size: tuple[int, int], strides: Mapping[str, int],
    how: str,
) -> dict[str, torch.Tensor]:
    """Image ``index``'s per-channel mean (``how="avg"``) or max (``"max"``) over the positions of its valid region
    at each level of ``strides``: ``{level: (C,) float32}``, from the outputs as the model gave them (before any
    cast for storage), where they are."""
    vectors = {}
    for name, stride in strides.items():
        height, width = map_size(*input_size, stride)
        output = outputs[name]
        if _channels_innermost_on_cpu(output):  # reduced over w, then h: C stays the fast dimension
            pixels = output[index].permute(1, 2, 0)[:height, :width]
            vectors[name] = (pixels.sum(dim=1, dtype=torch.float32).sum(dim=0) / (height * width) if how == "avg"
                             else pixels.amax(dim=1).amax(dim=0).float())
        else:
            region = output[index, :, :height, :width].float()
            vectors[name] = region.mean(dim=(1, 2)) if how == "avg" else region.amax(dim=(1, 2))
    return vectors


def _in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as one flat view in memory order, where they are dense in NCHW or channels_last order: a
    reduction over a channels_last tensor in NCHW order runs ~7x slower on the CPU (measured with aminmax)."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).reshape(-1)
    return tensor.reshape(-1) if tensor.is_contiguous() else tensor


def _may_hold_inf_or_nan(crop: torch.Tensor) -> bool:
    """On the CPU, whether a float16 crop holds inf or NaN (one min/max pass over the crop, half the bytes of the
    float32 map it came from); on other devices True without looking."""
    if crop.device.type != "cpu":
        return True
    low, high = torch.aminmax(crop)
    return not (-FLOAT16_MAX <= float(low) and float(high) <= FLOAT16_MAX)  # False for NaN too
