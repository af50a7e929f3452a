"""Resize, normalise and pad images exactly as the weights' own framework does.

Every checkpoint in ``fpnx.weights`` carries a :class:`Preprocessing`, so weights and pixels can never be
mismatched (RGB vs BGR, 0-1 vs 0-255, mean/std, resize rule).

torch is imported by the functions that use it: the workers of a GPU run need only the sizes and the uint8 resize
from here, and start without torch (measured here: ~3.5 s of CPU and ~500 MB of memory less per worker).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

PIXEL_ORDERS = ("RGB", "BGR")
RESIZE_RULES = ("torchvision", "detectron2")


@dataclass(frozen=True)
class Preprocessing:
    """What a checkpoint expects of its input pixels.

    ``mean`` and ``std`` are per network input channel (so in ``pixel_order``) and in units of ``value_range``:
    pixels are scaled to ``[0, value_range]`` before ``(x - mean) / std``.

    ``resize`` names the framework whose resize is reproduced:

    - ``"torchvision"``: normalise the float image first, then bilinear ``F.interpolate`` (align_corners=False),
      each side ``floor(side * scale)`` (``GeneralizedRCNNTransform``).
    - ``"detectron2"``: PIL bilinear on the uint8 image, sides rounded half up (``ResizeShortestEdge``), then
      normalise.

    ``scale = min(min_size / short_side, max_size / long_side)``; no side becomes smaller than 1.
    The network input is zero-padded (after normalisation) to a multiple of ``size_divisibility``.
    """

    pixel_order: str
    value_range: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 32

    def __post_init__(self) -> None:
        if self.pixel_order not in PIXEL_ORDERS:
            raise ValueError(f"pixel_order must be one of {PIXEL_ORDERS}, got {self.pixel_order!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def replace(self, **changes: Any) -> "Preprocessing":
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


TORCHVISION = Preprocessing(
    pixel_order="RGB",
    value_range=1.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    resize="torchvision",
)

# detectron2's MSRA-initialised R50-FPN configs: BGR 0-255, caffe mean, unit std.
DETECTRON2 = Preprocessing(
    pixel_order="BGR",
    value_range=255.0,
    mean=(103.530, 116.280, 123.675),
    std=(1.0, 1.0, 1.0),
    resize="detectron2",
)


# ---------------------------------------------------------------------------------------------------------
# Applying a Preprocessing to one image


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One image ready for the network, before padding.

    ``tensor`` is float32 ``(3, h, w)``: resized, scaled to ``value_range``, channels in ``pixel_order``,
    normalised. ``input_height``/``input_width`` are its size, the network input before padding (the names of
    ``fpnx.open_features(...).info(i)``);
    ``scale`` is the factor its sides were multiplied by before rounding (see :func:`resized_size`).
    """

    tensor: torch.Tensor
    input_height: int
    input_width: int
    scale: float


def resized_size(height: int, width: int, spec: Preprocessing) -> tuple[int, int, float]:
    """``(new_height, new_width, scale)`` of an image of ``height x width`` under ``spec.resize``.

    ``scale`` is the factor both sides are multiplied by before rounding, so ``new_side / side`` differs
    from it by less than ``1 / side`` (rounding) unless a side was raised to the minimum of 1.

    - ``"torchvision"``: ``scale = min(min_size / short_side, max_size / long_side)`` and each side is
      ``floor(side * scale)``, in Python floats, as ``F.interpolate(scale_factor=scale,
      recompute_scale_factor=True)`` computes it in ``GeneralizedRCNNTransform``.
    - ``"detectron2"``: as ``ResizeShortestEdge.get_output_shape``: the short side becomes ``min_size`` and
      the long one ``side * min_size / short_side``; if the long one exceeds ``max_size`` both are scaled
      down by ``max_size / long``; each is then rounded half up, ``int(x + 0.5)``. ``scale`` is the product
      of the two factors.

    No side is ever below 1. This is the one deliberate difference from torchvision, which computes 0
    for very thin strips (e.g. 1 x 300 with max_size 224) and then fails inside ``F.interpolate``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if spec.resize == "torchvision":
        scale = min(spec.min_size / min(height, width), spec.max_size / max(height, width))
        new_height, new_width = math.floor(height * scale), math.floor(width * scale)
    else:
        short_side = float(spec.min_size)
        scale = short_side / min(height, width)
        if height < width:
            scaled_height, scaled_width = short_side, scale * width
        else:
            scaled_height, scaled_width = scale * height, short_side
        longest = max(scaled_height, scaled_width)
        if longest > spec.max_size:
            cap = spec.max_size / longest
            scaled_height, scaled_width, scale = scaled_height * cap, scaled_width * cap, scale * cap
        new_height, new_width = int(scaled_height + 0.5), int(scaled_width + 0.5)
    return max(1, new_height), max(1, new_width), scale


def padded_size(height: int, width: int, divisibility: int) -> tuple[int, int]:
    """``height`` and ``width`` rounded up to multiples of ``divisibility`` (0 or 1: unchanged)."""
    if divisibility < 0:
        raise ValueError(f"divisibility must be >= 0, got {divisibility}")
    if divisibility <= 1:
        return height, width
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility


def prepare_image(rgb: np.ndarray, spec: Preprocessing) -> PreparedImage:
    """Resize and normalise an ``(H, W, 3)`` uint8 RGB image as ``spec`` says; no padding.

    - ``"torchvision"`` (as ``GeneralizedRCNNTransform``, bit for bit): pixels to float32 divided by
      ``255 / value_range`` (for 1.0 exactly ``to_tensor``'s ``/ 255``), channels in ``pixel_order``,
      ``(x - mean) / std``, then bilinear ``F.interpolate`` (align_corners=False) on the normalised image.
    - ``"detectron2"`` (as ``ResizeTransform`` on uint8 + ``GeneralizedRCNN.preprocess_image``): PIL bilinear
      resize of the uint8 image, then float32, divided by ``255 / value_range`` (for 255: unchanged),
      channels in ``pixel_order``, ``(x - mean) / std``.

    The resize is skipped when the size does not change. Runs without autograd and sets no global state.
    It is :func:`resize_on_host` followed by :func:`finish_on_device` on the CPU: a device that finishes the
    work runs the same operations.
    """
    pixels, input_height, input_width, scale = resize_on_host(rgb, spec)
    tensor = finish_on_device(pixels_tensor(pixels), spec, (input_height, input_width))
    return PreparedImage(tensor=tensor, input_height=input_height, input_width=input_width, scale=scale)


def resize_on_host(rgb: np.ndarray, spec: Preprocessing) -> tuple[np.ndarray, int, int, float]:
    """The part of preprocessing done on uint8 pixels: ``(pixels, input_height, input_width, scale)``.

    detectron2 weights: the PIL resize (their framework resizes uint8 images on the host); torchvision weights:
    nothing (their framework resizes the normalised float image, wherever the model runs).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    new_height, new_width, scale = resized_size(height, width, spec)
    if spec.resize == "detectron2" and (new_height, new_width) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BILINEAR))
    return rgb, new_height, new_width, scale


def pixels_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A uint8 array as a tensor without copying, which is only read: read-only arrays are fine (torch's warning
    about writing to them does not apply), mirrored views (negative strides) are copied."""
    import torch

    if any(stride < 0 for stride in pixels.strides):
        pixels = np.ascontiguousarray(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


def _normalise_(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """``(batch - mean) / std`` per channel, in place on a ``(1, C, H, W)`` batch.

    Over channels-last memory on the CPU, each row of ``W * C`` values takes ``mean`` and ``std`` repeated along
    it: the same subtraction and division of each value (so the same result, bit for bit), but vectorised, where
    a ``(C, 1, 1)`` broadcast runs ~7x slower (1.1 ms against 0.15 for a 640x480 image, measured).
    """
    import torch

    _, channels, height, width = batch.shape
    if batch.device.type == "cpu" and batch.is_contiguous(memory_format=torch.channels_last):
        rows = batch.permute(0, 2, 3, 1).view(height, width * channels)
        row_mean, row_std = _repeated_along_row(mean, std, width)
        rows.sub_(row_mean).div_(row_std)
        return
    channel_mean, channel_std = _mean_and_std(mean, std, batch.device)
    batch.sub_(channel_mean).div_(channel_std)


@functools.lru_cache(maxsize=64)
def _repeated_along_row(mean: tuple[float, ...], std: tuple[float, ...],
                        width: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return torch.tensor(mean, dtype=torch.float32).repeat(width), torch.tensor(std, dtype=torch.float32).repeat(width)


@functools.lru_cache(maxsize=16)
def _mean_and_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, 1, 1)`` float32 tensors on ``device``, made once: a fresh small host-to-GPU copy per image would make
    the host wait for everything queued on the GPU."""
    import torch

    return (torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None],
            torch.tensor(std, dtype=torch.float32, device=device)[:, None, None])


def finish_on_device(pixels: torch.Tensor, spec: Preprocessing, input_size: tuple[int, int]) -> torch.Tensor:
    """Float32 ``(3, h, w)`` network input from :func:`resize_on_host`'s uint8 ``(H, W, 3)`` pixels, on their
    device: scaled, channels in ``pixel_order``, normalised, and (torchvision weights) resized to
    ``input_size`` with bilinear ``F.interpolate`` (align_corners=False), as ``GeneralizedRCNNTransform`` does
    on the model's device.

    On the CPU the resize runs over the three channels as three one-channel images. PyTorch computes each value
    of a bilinear resize with one of two kernels that round differently: its general one on any number of
    threads for one channel, and for torchvision's ``(1, 3, H, W)`` image whenever it has several threads (its
    usual setting); a channels-last one for three channels on exactly one thread. So the values equal, bit for
    bit, torchvision's as it usually runs, never depend on the number of threads, and come ~1.5x faster than
    the channels-last kernel gives them (measured, 640x480 to 800x1066 on one thread). Where nothing is resized
    (detectron2 weights), the work stays in the pixels' own channels-last memory order, the CPU network's.
    """
    import torch
    import torch.nn.functional as F

    on_cpu = pixels.device.type == "cpu"
    resizing = tuple(pixels.shape[:2]) != tuple(input_size)
    layout = torch.channels_last if on_cpu and not resizing else torch.contiguous_format
    with torch.no_grad():
        channels = pixels[None].permute(0, 3, 1, 2)  # (1, 3, H, W) over (H, W, 3) memory
        if spec.pixel_order == "BGR":  # channel by channel: a flip of channels-last memory runs ~2x slower
            batch = torch.empty(channels.shape, dtype=torch.float32, device=channels.device, memory_format=layout)
            for channel in range(3):
                batch[:, channel].copy_(channels[:, 2 - channel])
        else:
            batch = channels.to(torch.float32, memory_format=layout)
        divisor = 255.0 / spec.value_range
        if divisor != 1.0:
            batch.div_(divisor)
        _normalise_(batch, spec.mean, spec.std)
        if resizing:
            images = batch.view(3, 1, *batch.shape[2:]) if on_cpu else batch  # see above: one kernel, any threads
            batch = F.interpolate(images, size=input_size, mode="bilinear", align_corners=False).view(1, 3, *input_size)
    return batch[0]


def pad_image(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad a ``(3, h, w)`` tensor at the bottom and right to ``(3, height, width)``.

    Zero is the normalised value the network sees as padding (both frameworks pad after normalising).
    Returns ``tensor`` itself when no padding is needed.
    """
    import torch.nn.functional as F

    _, current_height, current_width = tensor.shape
    if height < current_height or width < current_width:
        raise ValueError(f"cannot pad {current_height}x{current_width} to the smaller {height}x{width}")
    if (height, width) == (current_height, current_width):
        return tensor
    return F.pad(tensor, (0, width - current_width, 0, height - current_height))
