"""What a worker does with one image: decode it, then preprocess as much as belongs on the host.

On the CPU everything happens here (resize and normalise, float32). When a GPU runs the model, workers only
decode (and, for detectron2 weights, resize the uint8 image with PIL, as detectron2 does) and the device finishes
the work (:func:`fpnx.preprocess.finish_on_device`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImageError, first_line
from ..preprocess import Preprocessing, finish_on_device, pixels_tensor, resize_on_host
from ..sources import DEFAULT_MAX_PIXELS, ImageSource, decode_source


@dataclass(frozen=True)
class LoadOptions:
    """How workers load images. ``finish_here``: resize and normalise in the worker (float32 ``(3, h, w)``);
    otherwise the worker hands over uint8 ``(H, W, 3)`` pixels from :func:`~fpnx.preprocess.resize_on_host`."""

    preprocessing: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False
    finish_here: bool = True


@dataclass
class LoadedImage:
    """One image ready for the network, or the reason it failed.

    ``pixels`` is float32 ``(3, h, w)`` (unpadded; channels last in memory once in a slot) when the worker
    finished the preprocessing, else uint8 ``(H, W, 3)``. It may be a view into a shared-memory slot of the loader:
    ``ImageLoader.release(item)`` once it is no longer needed lets the slot be reused. ``padded`` is then the
    same image zero-padded to the size the network needs (float32 only), ready to run without a copy.
    """

    origin: ImageSource
    pixels: np.ndarray | None = None
    height: int = 0
    width: int = 0
    input_height: int = 0
    input_width: int = 0
    scale: float = 0.0
    error: str | None = None
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    slot: int | None = None
    padded: np.ndarray | None = field(default=None, repr=False)
    slot_layout: tuple | None = field(default=None, repr=False)  # (shape, dtype, unpadded shape) in the slot

    @property
    def ok(self) -> bool:
        return self.error is None


def load_image(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """Decode and preprocess one image; every exception becomes a one-line failure reason."""
    start = time.perf_counter()
    try:
        decoded = decode_source(image, max_pixels=options.max_pixels, allow_truncated=options.allow_truncated)
        decoded_at = time.perf_counter()
        pixels, input_height, input_width, scale = resize_on_host(decoded.rgb, options.preprocessing)
        if options.finish_here:
            tensor = finish_on_device(pixels_tensor(pixels), options.preprocessing, (input_height, input_width))
            pixels = tensor.numpy()
    except ImageError as error:
        return LoadedImage(image, error=str(error), decode_s=time.perf_counter() - start)
    except MemoryError:
        return LoadedImage(image, error="out of memory while decoding", decode_s=time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - one bad image must never stop a run
        reason = f"{type(error).__name__}: {first_line(error, '')}"
        return LoadedImage(image, error=reason, decode_s=time.perf_counter() - start)
    return LoadedImage(
        image,
        pixels=np.asarray(pixels),
        height=decoded.height,
        width=decoded.width,
        input_height=input_height,
        input_width=input_width,
        scale=scale,
        decode_s=decoded_at - start,
        preprocess_s=time.perf_counter() - decoded_at,
    )
